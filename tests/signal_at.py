"""A test-only callback that signals its own process at an exact point of a run.

Given on the command line (`+callbacks.signal_at._target_=tests.signal_at.SignalAt ...`), so that
the run under test is train.py as a user runs it. It fires once: a marker file beside the run
remembers that it did, so the resumed run, which must repeat the run's overrides, goes on in peace.
"""

import os
import signal
from pathlib import Path

import lightning as L
from hydra.core.hydra_config import HydraConfig


class SignalAt(L.Callback):
    """Sends `signal_name` to this process at `point`:

    - `step`: right after training step `step` (global, 1-based);
    - `batch`: right after training batch `batch` (0-based) of epoch `epoch`;
    - `last_step`: as the last step of epoch `epoch` (1-based) begins;
    - `validation`: after validation batch `batch` of epoch `epoch`'s validation;
    - `fit_end`: when training has ended, before the test begins;
    - `test`: after test batch `batch` of the final test.

    In a sweep, only in the run whose job number is `job`, if given; `repeat` times at once (a
    second Ctrl-C); with `group`, to every process of its process group, as a terminal sends Ctrl-C
    (start the run in a session of its own).
    """

    def __init__(
        self,
        point: str,
        marker: str,
        signal_name: str = "SIGTERM",
        step: int = 0,
        epoch: int = 1,
        batch: int = 0,
        rank: int = 0,
        job: int | None = None,
        repeat: int = 1,
        group: bool = False,
    ) -> None:
        self.point, self.marker = point, Path(marker)
        self.signum = signal.Signals[signal_name]
        self.step, self.epoch, self.batch, self.rank = step, epoch, batch, rank
        self.job, self.repeat, self.group = job, repeat, group

    def _fire(self, trainer: L.Trainer) -> None:
        if trainer.global_rank != self.rank or self.marker.exists():
            return
        if self.job is not None and HydraConfig.get().job.num != self.job:
            return
        self.marker.write_text(f"{self.signum.name} at step {trainer.global_step}\n")
        for _ in range(self.repeat):
            if self.group:
                os.killpg(os.getpgid(0), self.signum)
            else:
                os.kill(os.getpid(), self.signum)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.point == "step" and trainer.global_step == self.step:
            self._fire(trainer)
        if self.point == "batch" and trainer.current_epoch + 1 == self.epoch and batch_idx == self.batch:
            self._fire(trainer)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.point == "fit_end":
            self._fire(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        last = batch_idx + 1 == trainer.num_training_batches
        if self.point == "last_step" and last and trainer.current_epoch + 1 == self.epoch:
            self._fire(trainer)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        in_epoch = trainer.current_epoch + 1 == self.epoch and not trainer.sanity_checking
        if self.point == "validation" and in_epoch and batch_idx == self.batch:
            self._fire(trainer)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self.point == "test" and batch_idx == self.batch:
            self._fire(trainer)
