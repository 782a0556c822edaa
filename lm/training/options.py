"""The training options (model.*), the run's (seed, resume, overwrite), and the check of a whole
command: every problem of the network's, the training's, the data's, the Trainer's, the callbacks'
and the logger's options at once, one line each, before any data is read."""

import importlib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from lm.data.options import DataOptions
from lm.models.network import network_problems
from lm.options import SEED, above, argument_problems, at_least, defaults, option, problems, refuse
from lm.training.trainer import check_precision, trainer_problems


@dataclass(frozen=True)
class TrainingOptions:
    """model.*: the loss, the schedule and the optimiser (the network's options are model.net.*)."""

    lr: float = option(1.0, at_least(0))
    """SGD's learning rate before any decay (Zaremba: 1; AWD-LSTM: 30, with loss_average=tokens)."""
    lr_decay: float = option(0.5, above(0))
    """The lr of 0-based epoch e: lr * lr_decay ** max(e + 1 - decay_after, 0)."""
    decay_after: int = option(4, at_least(0))
    """Epochs at the full lr."""
    loss_average: Literal["streams", "tokens"] = option("streams")
    """streams: Zaremba's scale, summed over the window (lr 1, clip 5); tokens: a mean per target."""
    ar: float = option(0.0, at_least(0))
    """Activation regularisation: ar * mean(dropped last-layer output ** 2)."""
    tar: float = option(0.0, at_least(0))
    """Temporal activation regularisation: tar * mean((h_t - h_t-1) ** 2)."""
    weight_decay: float = option(0.0, at_least(0))
    """L2, in the optimiser."""
    asgd_nonmono: int | None = option(None, at_least(1))
    """N: average the weights once validation is no better than N epochs ago (NT-ASGD); null: SGD."""
    compile: bool = option(False)
    """torch.compile the softmax and the loss (docs/performance.md)."""


@dataclass(frozen=True)
class RunOptions:
    """train.py's top-level keys."""

    seed: int = option(1, SEED)
    """Seeds Python, NumPy and torch: the same seed gives the same numbers on the same machine."""
    resume: str | None = option(None)
    """A run folder (or one of its checkpoints/*.ckpt) to continue, in that folder."""
    overwrite: bool = option(False)
    """True: a run folder that holds an earlier run's checkpoints is emptied first."""
    continue_sweep: bool = option(False)
    """With -m and an interrupted sweep's hydra.sweep.dir: its finished runs are kept, the others go on."""


def check_command(cfg: DictConfig) -> None:
    """Every problem of train.py's command, one line each, before any data is read."""
    check_precision(cfg.trainer)  # a machine's limit, not a mistake in the command: alone
    data = {key: value for key, value in cfg.data.items() if key not in _corpus_keys(cfg.data)}
    if data.get("seed") == cfg.seed:  # conf/data/: the run's seed, which RunOptions checks
        del data["seed"]
    refuse(
        [
            *network_problems(cfg.model.net),
            *problems(TrainingOptions, _values(cfg.model, "net"), "model"),
            *problems(DataOptions, data, "data"),
            *problems(RunOptions, {key: cfg[key] for key in defaults(RunOptions)}, ""),
            *trainer_problems(cfg.trainer),
            *_built_objects_problems(cfg),
            *_unsafe_checkpoints(cfg.get("callbacks") or {}),
        ]
    )


def _unsafe_checkpoints(callbacks: Mapping[str, Any]) -> list[str]:
    """ModelCheckpoint's own last.ckpt, or its save on an exception, would write a checkpoint where no
    safe point is (lm/training/safe_stop.py): last.ckpt is callbacks.training_checkpoint's."""
    best = callbacks.get("model_checkpoint") or {}
    why = {
        "save_last": "would write last.ckpt at its own moments, over the one written at safe points",
        "save_on_exception": "would save wherever an exception struck, not at a safe point",
    }
    return [
        f"callbacks.model_checkpoint.{key}={best[key]!r} {reason}: leave it false (a stop signal or "
        "Ctrl-C saves last.ckpt at the next safe point)."
        for key, reason in why.items()
        if best.get(key) is True or best.get(key) == "link"
    ]


def _built_objects_problems(cfg: DictConfig) -> list[str]:
    """The true/false arguments of what trainer.*, callbacks.<name>.* and logger.* build, checked
    against the classes' own annotations (they are not ours to declare again)."""
    lines = argument_problems(L.Trainer, cfg.trainer, "trainer")
    nodes = {f"callbacks.{name}": node for name, node in (cfg.get("callbacks") or {}).items()}
    for path, node in {**nodes, "logger": cfg.get("logger")}.items():
        target = _built_class(node)
        if target is not None:
            lines += argument_problems(target, node, path)
    return lines


def _built_class(node: Any) -> type | None:
    """The class a config node builds (its `_target_`); None for a node that builds nothing or a class
    that does not import, which `instantiate` reports. By hand: Hydra's get_class logs an error first."""
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return None
    module, _, name = str(node._target_).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _values(node: Mapping[str, Any], *leave_out: str) -> dict[str, Any]:
    """A node's options as plain values: Hydra's keys (`_target_`, ...) and `leave_out` left out."""
    plain = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    return {key: value for key, value in plain.items() if not key.startswith("_") and key not in leave_out}


def _corpus_keys(data: DictConfig) -> set[str]:
    """What a corpus's datamodule takes besides the data options: where its files are."""
    return {"_target_", *inspect.signature(get_class(data._target_)).parameters} - {"options"}
