"""The Lightning Trainer from `cfg.trainer`, with Lightning 1.x's `gpus=` still understood."""

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.callbacks import Callback, ProgressBar

# Private, but the one way to tell that `ddp` will re-run the command line; a test fails if it moves.
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from omegaconf import DictConfig, OmegaConf

from lm.errors import UserError

log = logging.getLogger(__name__)


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
    trainer = L.Trainer(**arguments, callbacks=list(callbacks), **objects)
    _refuse_to_relaunch_a_sweep(trainer)
    return trainer


def _refuse_to_relaunch_a_sweep(trainer: L.Trainer) -> None:
    """Lightning's `ddp` starts ranks 1.. by re-running the command line; under `-m` every one of
    them would run the whole sweep again. `ddp_spawn` starts workers instead, and on SLURM (or
    torchrun) the processes already exist, so nothing is relaunched."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    relaunches = isinstance(trainer.strategy.launcher, _SubprocessScriptLauncher) and trainer.world_size > 1
    if relaunches and not trainer.strategy.cluster_environment.creates_processes_externally:
        raise UserError(
            f"A Hydra sweep (-m) cannot train on {trainer.world_size} processes with Lightning's ddp "
            "strategy: it starts each extra process by re-running the command line, that is the whole "
            "sweep. Add trainer.strategy=ddp_spawn, sweep on a cluster with hydra/launcher=slurm, or "
            "train each configuration without -m."
        )


def recover_training_state(trainer: L.Trainer) -> None:
    """After `ddp_spawn`, bring back what the processes that trained knew.

    The spawn launcher returns the weights, the logged metrics and the best checkpoint's path,
    but not the callbacks' states (the best score, the token counts) nor the epoch count; the
    last checkpoint, saved when training ended, holds them.
    """
    checkpoint = trainer.checkpoint_callback
    if checkpoint is None or not checkpoint.best_model_path or checkpoint.best_model_score is not None:
        return  # trained in this process, or nothing saved
    last = Path(checkpoint.dirpath) / f"{checkpoint.CHECKPOINT_NAME_LAST}{checkpoint.FILE_EXTENSION}"
    if not last.exists():  # callbacks.model_checkpoint.save_last=false
        log.warning("No %s: the best score, epochs and tokens/s of this ddp_spawn run are unknown.", last)
        return
    saved = torch.load(last, map_location="cpu", weights_only=False)
    for callback in trainer.callbacks:
        if callback.state_key in saved["callbacks"]:
            callback.load_state_dict(saved["callbacks"][callback.state_key])
    trainer.fit_loop.epoch_progress.load_state_dict(saved["loops"]["fit_loop"]["epoch_progress"])
