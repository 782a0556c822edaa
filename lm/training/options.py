"""The training options (model.*) and the run's (seed, resume, overwrite); train.py's whole command
is checked by lm/training/command_check.py. Without Lightning: lm/config.py registers these for
every entry point."""

from dataclasses import dataclass
from typing import Literal

from lm.options import SEED, above, at_least, option


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
