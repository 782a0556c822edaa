"""Word-level recurrent language models with PyTorch Lightning and Hydra."""

import warnings
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# Lightning 2.6 calls a torch API that torch 2.13 deprecates; nothing for a user to act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
