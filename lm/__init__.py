"""Word-level LSTM language models with PyTorch Lightning and Hydra."""

import warnings
from pathlib import Path

from omegaconf import OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _devices_per_node(gpus: int | None, devices: object) -> int:
    from lm.errors import UserError

    count = gpus or devices
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise UserError(
            f"trainer.devices={devices!r}: the SLURM launcher needs a number of devices per node."
        )
    return count


def _folder_name(text: str, max_bytes: int) -> str:
    """`text` as one folder name: no "/", at most `max_bytes` UTF-8 bytes (file systems allow 255)."""
    name = text.replace("/", "_")
    if len(name.encode()) <= max_bytes:
        return name
    return name.encode()[: max_bytes - 3].decode(errors="ignore") + "..."


def _resumed_run_folder(resume: str | None, new_folder: str) -> str:
    from lm.training.run_folder import resumed_run_folder  # here, so that `import lm` stays light

    return resumed_run_folder(resume, new_folder)


# Resolvers for conf/:
# `${project_root:}` puts shared files (the PTB download, the token cache) under the repository
# whatever directory a run starts from.
OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT), replace=True)
# hydra/launcher/slurm.yaml: one SLURM task per device, whichever of trainer.gpus / devices is set,
# and GPUs only for GPU runs.
OmegaConf.register_new_resolver("devices_per_node", _devices_per_node, replace=True)
OmegaConf.register_new_resolver(
    "gpus_per_node",
    lambda accelerator, gpus, devices: 0 if accelerator == "cpu" else _devices_per_node(gpus, devices),
    replace=True,
)
# hydra/default.yaml: sweep runs' folders named by their overrides; a resumed run writes into its
# own folder and keeps the configuration its first start recorded in .hydra/ (a resumption's goes
# to .hydra/resumed-<time>/).
OmegaConf.register_new_resolver("folder_name", _folder_name, replace=True)
OmegaConf.register_new_resolver("resumed_run_folder", _resumed_run_folder, replace=True)
OmegaConf.register_new_resolver(
    "hydra_subdir", lambda resume, now: f".hydra/resumed-{now}" if resume else ".hydra", replace=True
)

# Lightning 2.6 calls a torch API that torch 2.13 deprecates; nothing for a user to act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
