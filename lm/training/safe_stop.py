"""When a checkpoint may be written: signals, safe points and `last.ckpt` (docs/design.md,
"Interruptions"; what a checkpoint holds is lm/training/checkpoint.py's).

One callback owns it. A signal (SIGTERM, SIGUSR1, a first Ctrl-C) only sets a flag; a second Ctrl-C
stops at once, unsaved, as Lightning stops on a KeyboardInterrupt. A checkpoint is
written at a safe point only, where everything it holds agrees:
- after a complete training step that neither ends the epoch nor is followed by a validation;
- after an epoch's end: its validation, the module's epoch-end hook and the best checkpoint are
  done, and the learning rate of the next epoch follows from the epoch counter alone
  (lm/training/module.py).
Never inside a signal handler, never during validation or the test. `last.ckpt` is rewritten at
every epoch end and at every stop, through a temporary file in the same folder and a rename
(lm/training/checkpoint_io.py), so that no kill leaves it truncated.
"""

import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.multiprocessing import ProcessRaisedException

from lm.errors import UserError
from lm.training.checkpoint import random_state, restore_random_state
from lm.training.checkpoint_io import PARTIAL_PATTERN
from lm.training.lightning_private import step_is_followed_by_more_than_a_step, write_step_logs
from lm.training.trainer import is_logging_step, recover_state_after_spawn, slurm_job

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Stopped(Exception):
    """A signal stopped training at a safe point, after `last.ckpt` was written."""


class Interrupted(Exception):
    """A second Ctrl-C stopped training at once: nothing was saved since `last.ckpt` (if any)."""


def fit_until_stopped(
    trainer: L.Trainer, model: L.LightningModule, datamodule: L.LightningDataModule, ckpt_path: Path | None
) -> str | None:
    """Train (from `ckpt_path` when resuming): None when training ran to its end, else the reason a
    signal stopped it. The signal handlers are installed in this process from the start: ddp_spawn's
    launcher runs no hook, and a Ctrl-C reaches it as it reaches the workers. They are removed here
    when training stops early; otherwise they stay until the final test ends."""
    checkpointing = next((c for c in trainer.callbacks if isinstance(c, TrainingCheckpoint)), None)
    if checkpointing is not None:
        checkpointing._install()
    try:
        stopped = _fit(trainer, model, datamodule, ckpt_path, checkpointing)
    except BaseException:
        if checkpointing is not None:
            checkpointing._uninstall()
        raise
    if stopped and checkpointing is not None:
        checkpointing._uninstall()
    return stopped


def _fit(
    trainer: L.Trainer,
    model: L.LightningModule,
    datamodule: L.LightningDataModule,
    ckpt_path: Path | None,
    checkpointing: "TrainingCheckpoint | None",
) -> str | None:
    """Under ddp_spawn a worker's Stopped arrives as its traceback's text, and what the workers knew
    that the launcher does not return is read back from last.ckpt."""
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except Stopped as stop:
        return str(stop)
    except SIGTERMException as stop:  # Lightning's own, for a SIGTERM in the moment before training began
        return str(stop) or f"SIGTERM at step {trainer.global_step}, before training began: nothing saved"
    except ProcessRaisedException as error:  # ddp_spawn: a worker's exception, as its traceback
        text = str(error)
        marker = f"{Stopped.__module__}.Stopped: "
        if marker in text:
            return text.split(marker)[1].splitlines()[0]
        mistake = re.search(rf"^{re.escape(UserError.__module__)}\.\w+: (.*)", text, re.MULTILINE | re.DOTALL)
        if mistake:  # one the user can fix (a full disk): its own lines, as with one process
            raise UserError(mistake[1].strip()) from None
        raise
    except SystemExit:  # how Lightning ends on a KeyboardInterrupt (lightning/pytorch/trainer/call.py)
        if checkpointing is None or not checkpointing.interrupted:
            raise
        raise Interrupted(
            f"a second Ctrl-C at step {trainer.global_step}: {checkpointing.unsaved()}"
        ) from None
    recover_state_after_spawn(trainer)
    return None


class TrainingCheckpoint(Checkpoint):
    """Writes `<dirpath>/last.ckpt` at every epoch end and stops at the first safe point after a signal.

    A Checkpoint, so that Lightning calls its epoch-end hook after the LightningModule's. With
    several processes, the ranks agree to stop on logging steps and at epoch ends only, so that
    no step waits for the others (a grace period is far longer than `log_every_n_steps` steps).
    On SLURM, a SIGUSR1 (the time limit's warning) also requeues the job after the save; the
    requeued job goes on from `last.ckpt` in the same folder (lm/training/run_folder.py).
    """

    def __init__(self, dirpath: str, requeue_command: str = "scontrol requeue") -> None:
        self.dirpath = Path(dirpath)
        self.requeue_command = requeue_command
        self.signal: int | None = None  # the first stop signal received, by any stage
        self.interrupted = False  # a second Ctrl-C: the handler stopped training at once
        self._announce = True  # the first Ctrl-C says what happens next (rank 0 only)
        # The run's wall time: this process's (from here: train.py builds the callbacks first) and
        # that of the processes it resumes, counted to their last checkpoint.
        self._clock = time.perf_counter()
        self._earlier_seconds = 0.0
        self._validation_metrics: dict[str, torch.Tensor] = {}  # from the checkpoint resumed
        self._resuming = False  # whether the checkpoint being loaded resumes training
        self._previous: dict[int, object] = {}

    @property
    def last_path(self) -> Path:
        return self.dirpath / "last.ckpt"

    def unsaved(self) -> str:
        """What a stop at once left: the steps since last.ckpt, if there is one."""
        if self.last_path.is_file():
            return (
                f"stopped at once, the steps since the last checkpoint are lost; {self.last_path} is intact"
            )
        return "stopped at once, before anything was saved"

    @property
    def wall_seconds(self) -> float:
        """Seconds this run has taken, over every process that trained it."""
        return self._earlier_seconds + time.perf_counter() - self._clock

    # --- signals: a flag, nothing else -------------------------------------------------------------
    def _note(self, signum: int, frame: object) -> None:
        if signum == signal.SIGINT and self.signal is not None:
            self.interrupted = True  # a second Ctrl-C, or one after another signal: stop at once
            raise KeyboardInterrupt
        if self.signal is None:
            self.signal = signum
        if signum == signal.SIGINT and self._announce:  # no logging in a handler: its lock may be held
            os.write(
                sys.stderr.fileno(),
                b"\nCtrl-C: stopping at the next safe point, where last.ckpt is saved; "
                b"press Ctrl-C again to stop at once without saving.\n",
            )

    def _install(self) -> None:
        """Installed at each stage's setup, so that Lightning's teardown restores these between the
        fit and the test; and again over Lightning's own handlers once it has registered them (the
        sanity check, training, the test), which would otherwise stop at a point of their choosing,
        save inside the handler (SLURM), or broadcast from it (DDP). They stay until the test ends."""
        for signum in STOP_SIGNALS:
            previous = signal.signal(signum, self._note)
            self._previous.setdefault(signum, previous)

    def _uninstall(self) -> None:
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._note:
                signal.signal(signum, previous)
        self._previous = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._announce = trainer.is_global_zero
        self._install()

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()
        if self._validation_metrics:  # the validation logged before the stop, which the epoch end ranks
            trainer.callback_metrics.update(self._validation_metrics)
            self._validation_metrics = {}
        if trainer.is_global_zero:  # what a killed save left behind
            for partial in self.dirpath.glob(PARTIAL_PATTERN):
                partial.unlink()

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()  # a signal during the final test: the test finishes, then train.py says so

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "test":  # train.py's last stage
            self._uninstall()

    # --- the safe points ------------------------------------------------------------------------
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if step_is_followed_by_more_than_a_step(trainer):
            return  # the epoch's end, the validation or the step comes first; the flag waits for it
        if trainer.world_size > 1 and not is_logging_step(trainer, trainer.global_step):
            return
        if self._stop_requested(trainer):
            pl_module.check_weights_finite()  # on a GPU the loss is checked on logging steps only
            self._save_last(trainer)
            write_step_logs(trainer)
            self._stop(trainer, f"at step {trainer.global_step} (epoch {trainer.current_epoch + 1})")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_last(trainer)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The stop for a signal during the last step, the validation or the epoch's end: here, once
        # Lightning has written the epoch's logs and counted it; nothing has changed since the save.
        # After the last epoch there is no next one: training is complete, the short test still runs.
        if trainer.current_epoch > 0 and self._stop_requested(trainer):
            where = f"at the end of epoch {trainer.current_epoch} (step {trainer.global_step})"
            self._stop(trainer, where)

    def _stop_requested(self, trainer: L.Trainer) -> bool:
        """Whether to stop here; with several processes, whether any rank was signalled, and then
        every rank takes the same signal (a SIGUSR1 that reached rank 1 alone still requeues)."""
        if trainer.world_size > 1:
            signum = torch.tensor(self.signal or 0, device=trainer.strategy.root_device)
            signum = int(trainer.strategy.reduce(signum, reduce_op=torch.distributed.ReduceOp.MAX))
            self.signal = signum or None
        return self.signal is not None

    def _stop(self, trainer: L.Trainer, where: str) -> None:
        reason = f"{signal.Signals(self.signal).name} {where}: saved {self.last_path}"
        if self.signal == signal.SIGUSR1 and SLURMEnvironment.detect() and trainer.is_global_zero:
            reason += self._requeue()
        raise Stopped(reason)

    def _requeue(self) -> str:
        job = slurm_job()
        try:
            result = subprocess.run([*self.requeue_command.split(), job], capture_output=True, text=True)
        except OSError as error:  # no scontrol on this node's PATH
            return f"; requeueing SLURM job {job} failed ({error}): resume it with resume="
        if result.returncode:
            return f"; requeueing SLURM job {job} failed ({result.stderr.strip() or result.returncode})"
        return f"; requeued SLURM job {job}"

    def _save_last(self, trainer: L.Trainer) -> None:
        """`trainer.save_checkpoint` on every rank (it gathers); rank 0 writes it, to a temporary file
        beside `last.ckpt`, synced and renamed (the Trainer's WholeCheckpointIO), and the others wait."""
        # A save, not a load: Lightning's flag for writing the whole training state (optimiser, loops,
        # callbacks), not only the weights; nothing is unpickled. Given, so that Lightning does not log
        # its default at every save.
        trainer.save_checkpoint(self.last_path, weights_only=False)
        trainer.strategy.barrier("last.ckpt")

    # --- the last validation's values, the random generators and the run's wall time --------------
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # With validations inside the epoch, the epoch's end ranks the best checkpoint by the last
        # one; Lightning keeps logged values in memory only.
        checkpoint["validation_metrics"] = {
            key: value.cpu() for key, value in trainer.callback_metrics.items() if key.startswith("val/")
        }

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._validation_metrics = checkpoint.get("validation_metrics", {})
        # Lightning restores the callbacks' state, next, whenever it loads a checkpoint: also for the
        # final test of the best one, which is no resume (its time is this process's own already).
        self._resuming = trainer.state.fn == "fit"

    def state_dict(self) -> dict:
        return {**random_state(), "wall_seconds": self.wall_seconds, "earlier_seconds": self._earlier_seconds}

    def load_state_dict(self, state_dict: dict) -> None:
        """Resuming: the processes before this one took the saved wall time (none saved before
        the project wrote it: counted from this process on)."""
        if not self._resuming:
            return
        restore_random_state(state_dict)
        self._earlier_seconds = state_dict.get("wall_seconds", 0.0)

    def load_state_after_spawn(self, state_dict: dict) -> None:
        """ddp_spawn's launcher, after training: this process's clock already ran while the
        workers trained, so only the processes before it count (lm/training/trainer.py)."""
        self._earlier_seconds = state_dict.get("earlier_seconds", 0.0)
