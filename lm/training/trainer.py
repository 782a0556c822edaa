"""The Lightning Trainer from `cfg.trainer`, with Lightning 1.x's `gpus=` still understood."""

import functools
import logging
import os
import random
import socket
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment
from lightning.pytorch.callbacks import Callback, ModelSummary, ProgressBar
from omegaconf import DictConfig, OmegaConf

from lm.errors import Unsupported, UserError
from lm.options import refusal
from lm.training.checkpoint_file import read_checkpoint
from lm.training.checkpoint_io import WholeCheckpointIO
from lm.training.lightning_private import relaunches_the_command_line

log = logging.getLogger(__name__)


def trainer_arguments(trainer_cfg: DictConfig) -> dict[str, Any]:
    """Trainer keyword arguments; `gpus=N` means `accelerator=gpu, devices=N` (DDP when N > 1).

    Lightning 2 removed `gpus`, but `python train.py trainer.gpus=2` is how many users ask for
    GPUs; "auto" strategy picks DDP for several devices.
    """
    arguments = OmegaConf.to_container(trainer_cfg, resolve=True)
    if SLURMEnvironment.detect() and not arguments.get("plugins"):
        # lm.training.safe_stop saves and requeues at a safe point; Lightning's auto-requeue would save
        # inside its signal handler, wherever the signal interrupted the step.
        arguments["plugins"] = [SLURMEnvironment(auto_requeue=False)]
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


def trainer_problems(trainer: DictConfig) -> list[str]:
    """The Trainer's values that Lightning takes silently (`gradient_clip_val=-1` ascends the
    gradient, `log_every_n_steps=0` divides by zero) or refuses with a traceback only once the
    corpus is loaded, one line each. What Lightning 2.6 accepts and runs passes, 0 epochs included;
    what it refuses when built, `build_trainer` names."""
    batches = "null, an integer, 0 or more, or a share in [0.0, 1.0]"
    rules = {
        "max_epochs": (
            lambda v: v is None or _integer(v, -1),
            "an integer, 0 or more, -1 (no limit) or null",
        ),
        "max_steps": (lambda v: _integer(v, -1), "an integer, 0 or more, or -1 (no limit)"),
        "gradient_clip_val": (
            lambda v: v is None or (_number(v) and v >= 0),
            "null or a number, 0 or more (0: no clipping; a negative bound would ascend the gradient)",
        ),
        **{f"limit_{stage}_batches": (_batches, batches) for stage in ("train", "val", "test", "predict")},
        "check_val_every_n_epoch": (lambda v: v is None or _integer(v, 1), "null or an integer, 1 or more"),
        "val_check_interval": (
            lambda v: v != 0 and _batches(v),
            "null, an integer, 1 or more (batches), or a share of the epoch in (0.0, 1.0]",
        ),
        # 0 passes the Trainer's construction, then divides at the first step (ZeroDivisionError):
        # in is_logging_step below, and in Lightning's gradient accumulation.
        "log_every_n_steps": (lambda v: v is None or _integer(v, 1), "null (50) or an integer, 1 or more"),
        "accumulate_grad_batches": (lambda v: _integer(v, 1), "an integer, 1 or more"),
    }
    lines = [
        refusal(f"trainer.{key}", trainer[key], allowed)
        for key, (valid, allowed) in rules.items()
        if not valid(trainer[key])
    ]
    if trainer.use_distributed_sampler is True:  # docs/design.md, "Many devices"; a non-bool: lm/options.py
        lines.append(
            f"trainer.use_distributed_sampler={trainer.use_distributed_sampler} would let Lightning re-split "
            "and reorder the windows, which each rank reads in order from its own streams: set "
            "trainer.use_distributed_sampler=false."
        )
    return lines


def check_precision(trainer_cfg: DictConfig) -> None:
    """Refuse a bfloat16 precision on a CPU whose oneDNN has no bfloat16 LSTM, in one line, before
    any data is read: PyTorch would stop at the first step with "could not create a primitive
    descriptor for the LSTM forward propagation primitive". Running the LSTM in float32 instead
    would only be slower than `32-true` on such a CPU, so nothing is gained by allowing it."""
    precision = str(trainer_cfg.precision)
    if not precision.startswith("bf16") or not _runs_on_the_cpu(trainer_cfg) or cpu_runs_bf16_lstm():
        return
    raise Unsupported(
        f"trainer.precision={precision} cannot run on this CPU: PyTorch's LSTM (oneDNN) has no bfloat16 "
        "kernel for it (that needs AVX-512 or AMX). Use trainer.precision=32-true here, or bf16 on a GPU."
    )


def _runs_on_the_cpu(trainer_cfg: DictConfig) -> bool:
    if trainer_cfg.get("gpus"):
        return False
    accelerator = str(trainer_cfg.accelerator)
    return accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())


@functools.cache
def cpu_runs_bf16_lstm() -> bool:
    """Whether a bfloat16 LSTM runs on this CPU: tried once on a tiny one, as autocast runs it."""
    lstm = torch.nn.LSTM(8, 8, batch_first=True)
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            lstm(torch.zeros(1, 2, 8))
    except RuntimeError:
        return False
    return True


def _integer(value: object, smallest: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= smallest


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _batches(value: object) -> bool:
    """Lightning's limit_*_batches and val_check_interval: null, a number of batches or a share of them."""
    return value is None or _integer(value, 0) or (isinstance(value, float) and 0.0 <= value <= 1.0)


def build_trainer(trainer_cfg: DictConfig, callbacks: list[Callback] = (), **objects: Any) -> L.Trainer:
    """`callbacks` and `objects` (the logger) are what the config cannot hold.

    `trainer.enable_progress_bar=false` drops the configured bar, which Lightning would refuse, and
    `trainer.enable_model_summary=false` the configured summary, which Lightning would keep. A
    configured summary stands in for Lightning's own, without its note that it does on every run.
    Checkpoints are written whole or not at all and read only when intact (WholeCheckpointIO).
    """
    arguments = trainer_arguments(trainer_cfg)
    plugins = arguments.get("plugins") or []
    arguments["plugins"] = [*(plugins if isinstance(plugins, list) else [plugins]), WholeCheckpointIO()]
    if arguments.get("enable_progress_bar") is False:
        callbacks = [callback for callback in callbacks if not isinstance(callback, ProgressBar)]
    if arguments.get("enable_model_summary") is False:
        callbacks = [callback for callback in callbacks if not isinstance(callback, ModelSummary)]
    if any(isinstance(callback, ModelSummary) for callback in callbacks):
        arguments["enable_model_summary"] = False  # Lightning adds none of its own
    try:
        trainer = L.Trainer(**arguments, callbacks=list(callbacks), **objects)
    except UserError:
        raise
    except Exception as error:  # MisconfigurationException, ValueError, TypeError...: see the log
        log.debug("Lightning refused the Trainer's arguments", exc_info=error)
        raise UserError(_refusal_by_lightning(trainer_cfg, arguments, callbacks, objects, error)) from error
    _refuse_to_relaunch_a_sweep(trainer)
    _choose_main_port(trainer)
    return trainer


def _choose_main_port(trainer: L.Trainer) -> None:
    """The port where the processes of one machine meet (MASTER_PORT), below the kernel's ephemeral range.

    Lightning's own choice binds port 0, lets it go, and binds it again seconds later, once the
    processes have started (and again for the test and for each run of a sweep). Meanwhile any socket
    bound to port 0 may get it, another run's gloo pairs say, and the run fails with EADDRINUSE: it
    did so once in CI. The kernel gives out no port below its ephemeral range, so only a service
    started on that very port could take it. A MASTER_PORT already set (by the user, a cluster, or an
    earlier run of this sweep) is kept; so is Lightning's choice where this is not Linux.
    """
    environment = getattr(trainer.strategy, "cluster_environment", None)
    if (
        trainer.world_size < 2
        or trainer.num_nodes > 1
        or type(environment) is not LightningEnvironment
        or environment.creates_processes_externally
        or {"MASTER_PORT", "STANDALONE_PORT"} & os.environ.keys()
    ):
        return
    try:
        lowest_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    ports = range(max(1024, lowest_ephemeral - 16384), lowest_ephemeral)
    # Not the `random` module: seed_everything has seeded it, and runs of one seed would pick one port.
    for port in random.SystemRandom().sample(ports, min(20, len(ports))):
        with socket.socket() as probe:
            try:
                probe.bind(("", port))
            except OSError:  # in use
                continue
        os.environ["MASTER_PORT"] = str(port)
        return


def _refusal_by_lightning(
    trainer_cfg: DictConfig,
    arguments: dict[str, Any],
    callbacks: list[Callback],
    objects: dict[str, Any],
    error: Exception,
) -> str:
    """The line naming the trainer.* value that Lightning's Trainer refused. Its exceptions name an
    argument in words of their own, so the arguments are given again, one more at a time in the
    config's order, until one is refused: alone, or beside those before it (barebones=true after
    log_every_n_steps=50)."""
    keys = list(arguments)
    previous_disable = logging.root.manager.disable
    logging.disable(logging.WARNING)  # each Trainer logs its devices, and may warn
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for count in range(len(keys) + 1):  # none (the callbacks and logger alone), the first, ...
                given = {key: arguments[key] for key in keys[:count]}
                try:
                    L.Trainer(**given, callbacks=list(callbacks), **objects)
                except Exception as refusal:
                    if count == 0:
                        break
                    key, value = keys[count - 1], arguments[keys[count - 1]]
                    if key in ("accelerator", "devices") and trainer_cfg.get("gpus"):
                        key, value = "gpus", trainer_cfg.gpus  # what the command said (trainer_arguments)
                    return f"trainer.{key}={value!r} is refused by Lightning: {_first_line(refusal)}"
    finally:
        logging.disable(previous_disable)
    return f"Lightning refuses the Trainer of trainer.*, callbacks.* and logger.*: {_first_line(error)}"


def _first_line(error: Exception) -> str:
    return (str(error).strip() or type(error).__name__).splitlines()[0]


def check_validation_interval(trainer: L.Trainer, windows: int, variable: bool) -> None:
    """A trainer.val_check_interval of N batches must fit in every epoch of `windows` training
    batches (fewer with variable windows), limit_train_batches applied: Lightning refuses it only
    when training begins, after the sanity check, and with a traceback (or in a later epoch with
    fewer variable windows). Call it as soon as the corpus is read."""
    interval, limit = trainer.val_check_interval, trainer.limit_train_batches
    if (
        not isinstance(interval, int)
        or trainer.check_val_every_n_epoch is None
        or not trainer.limit_val_batches
    ):
        return  # a share of the epoch, or validation counted across epochs, or none
    batches = min(windows, limit) if isinstance(limit, int) else int(windows * limit)
    if 0 < batches < interval:
        fewest = " at fewest (data.vary_num_steps=true)" if variable else ""
        raise UserError(
            f"trainer.val_check_interval={interval} batches is more than an epoch's {batches} training "
            f"batches{fewest}: give at most {batches}, a share of the epoch (0.5: twice an epoch), or "
            "trainer.check_val_every_n_epoch=null to count the batches across epochs."
        )


def _refuse_to_relaunch_a_sweep(trainer: L.Trainer) -> None:
    """Lightning's `ddp` starts ranks 1.. by re-running the command line; under `-m` every one of
    them would run the whole sweep again. `ddp_spawn` starts workers instead, and on SLURM (or
    torchrun) the processes already exist, so nothing is relaunched."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    relaunches = relaunches_the_command_line(trainer)
    if relaunches and not trainer.strategy.cluster_environment.creates_processes_externally:
        raise UserError(
            f"A Hydra sweep (-m) cannot train on {trainer.world_size} processes with Lightning's ddp "
            "strategy: it starts each extra process by re-running the command line, that is the whole "
            "sweep. Add trainer.strategy=ddp_spawn, sweep on a cluster with hydra/launcher=slurm, or "
            "train each configuration without -m."
        )


def slurm_job() -> str | None:
    """This SLURM job (an array's element as `<job>_<task>`), which keeps its id when requeued."""
    if not SLURMEnvironment.detect():
        return None
    if "SLURM_ARRAY_JOB_ID" in os.environ:
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
    return os.environ.get("SLURM_JOB_ID")


def is_logging_step(trainer: L.Trainer, steps: int) -> bool:
    """Whether the step that brings training to `steps` steps is one after which the logs are written
    (every `trainer.log_every_n_steps`): the steps that read values back from the device anyway."""
    return steps % trainer.log_every_n_steps == 0


def recover_state_after_spawn(trainer: L.Trainer) -> None:
    """After `ddp_spawn`, bring back what the processes that trained knew.

    The spawn launcher returns the weights, the logged metrics and the best checkpoint's path,
    but not the callbacks' states (the best score, the token counts) nor the epoch count; the
    last checkpoint, saved when training ended, holds them.
    """
    checkpoint = trainer.checkpoint_callback
    if checkpoint is None or not checkpoint.best_model_path or checkpoint.best_model_score is not None:
        return  # trained in this process, or nothing saved
    last = Path(checkpoint.dirpath) / f"{checkpoint.CHECKPOINT_NAME_LAST}{checkpoint.FILE_EXTENSION}"
    if not last.exists():  # no callbacks.training_checkpoint
        log.warning("No %s: the best score, epochs and tokens/s of this ddp_spawn run are unknown.", last)
        return
    saved = read_checkpoint(last, "checkpoints/last.ckpt")
    for callback in trainer.callbacks:
        if callback.state_key in saved["callbacks"]:
            load = getattr(callback, "load_state_after_spawn", callback.load_state_dict)
            load(saved["callbacks"][callback.state_key])
    trainer.fit_loop.epoch_progress.load_state_dict(saved["loops"]["fit_loop"]["epoch_progress"])
