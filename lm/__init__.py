"""Word-level LSTM language models with PyTorch Lightning and Hydra."""

import warnings
from pathlib import Path

from omegaconf import OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# `${project_root:}` in conf/ puts shared files (the PTB download, the token cache) under the
# repository whatever directory a run starts from.
OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT), replace=True)
# `${devices_per_node:${trainer.gpus},${trainer.devices}}`: processes per node, whichever of the
# two the user set (conf/hydra/launcher/slurm.yaml).
OmegaConf.register_new_resolver("devices_per_node", lambda gpus, devices: gpus or devices, replace=True)

# `${at_most:TEXT,N}`: TEXT cut to N characters (conf/hydra/default.yaml: sweep runs' folder names).
OmegaConf.register_new_resolver(
    "at_most", lambda text, length: text if len(text) <= length else text[: length - 3] + "...", replace=True
)

# Lightning 2.6 calls a torch API that torch 2.13 deprecates; nothing for a user to act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
