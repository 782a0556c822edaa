"""The Lightning Trainer from `cfg.trainer`, with Lightning 1.x's `gpus=` still understood."""

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ProgressBar
from omegaconf import DictConfig, OmegaConf

from lm.errors import UserError


def trainer_arguments(trainer_cfg: DictConfig) -> dict[str, Any]:
    """Trainer keyword arguments; `gpus=N` means `accelerator=gpu, devices=N` (DDP when N > 1).

    Lightning 2 removed `gpus`, but `python train.py trainer.gpus=2` is how many users ask for
    GPUs; "auto" strategy picks DDP for several devices.
    """
    arguments = OmegaConf.to_container(trainer_cfg, resolve=True)
    gpus = arguments.pop("gpus", None)
    if gpus is None or gpus == 0:
        return arguments
    if not torch.cuda.is_available():
        raise UserError(
            f"trainer.gpus={gpus} asks for GPUs but PyTorch sees none (torch.cuda.is_available() is "
            "False: no GPU, or a CPU-only PyTorch build). Drop trainer.gpus to train on the CPU."
        )
    if arguments.get("accelerator") not in ("auto", "gpu", "cuda"):
        raise UserError(f"trainer.gpus={gpus} conflicts with trainer.accelerator={arguments['accelerator']}.")
    arguments.update(accelerator="gpu", devices=gpus)
    return arguments


def build_trainer(trainer_cfg: DictConfig, callbacks: list[Callback] = (), **objects: Any) -> L.Trainer:
    """`callbacks` and `objects` (the logger) are what the config cannot hold.

    `trainer.enable_progress_bar=false` drops the configured bar, which Lightning would refuse.
    """
    arguments = trainer_arguments(trainer_cfg)
    if arguments.get("enable_progress_bar") is False:
        callbacks = [callback for callback in callbacks if not isinstance(callback, ProgressBar)]
    return L.Trainer(**arguments, callbacks=list(callbacks), **objects)
