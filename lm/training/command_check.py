"""The check of train.py's whole command: every problem of the network's, the training's, the
data's, the Trainer's, the callbacks' and the logger's options at once, one line each, before any
data is read."""

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

import lightning as L
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from lm.data.options import DataOptions
from lm.models.network import network_problems
from lm.options import argument_problems, defaults, problems, refuse
from lm.training.options import RunOptions, TrainingOptions
from lm.training.trainer import check_precision, trainer_problems


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
