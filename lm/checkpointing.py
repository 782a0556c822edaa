"""When a checkpoint may be written, and what it holds (design.md, "Interruptions").

One callback owns it. A signal (SIGTERM, SIGUSR1; on SLURM too) only sets a flag. A checkpoint is
written at a safe point only, where everything it holds agrees:
- after a complete training step that neither ends the epoch nor is followed by a validation;
- after an epoch's end: its validation, the module's epoch-end hook and the best checkpoint are
  done, and the learning rate of the next epoch follows from the epoch counter alone (lm/module.py).
Never inside a signal handler, never during validation or the test. `last.ckpt` is rewritten at
every epoch end and at every stop, through a temporary file in the same folder and a rename, so
that no kill leaves it truncated.

What a checkpoint holds besides Lightning's weights, optimiser and loop counters: the module's
carried LSTM state, averaged weights, metric sums and vocabulary (`LanguageModel.on_save_checkpoint`),
the random generators (here: Lightning leaves them out, and without them a resumed run draws other
dropout masks), and the best scores (`BestCheckpoint`).
"""

import logging
import os
import pickle
import random
import re
import signal
import subprocess
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint

from lm.errors import UserError

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def read_checkpoint(path: Path, key: str) -> dict:
    """A checkpoint's contents, unpickled by `torch.load(weights_only=True)`: tensors and plain values
    only, which is all the project writes, so that a checkpoint someone handed over cannot run code.
    `key` names the option that gave the path (resume, ckpt_path) in the one-line refusal."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise unsafe_checkpoint(path, key, error) from None


def unsafe_checkpoint(path: Path, key: str, error: Exception) -> UserError:
    """The refusal of a checkpoint that holds more than tensors and plain values (torch's own
    message is a page long); what it holds is named when torch says."""
    found = re.search(r"GLOBAL (\S+)", str(error))
    what = f"a reference to {found.group(1)}" if found else "an object"
    return UserError(
        f"{key}={path} holds {what}, not only tensors and plain values, and unpickling it could run code: "
        "it was not opened. Use a checkpoint written by this project's train.py, from a source you trust."
    )


class Stopped(Exception):
    """A signal stopped training at a safe point, after `last.ckpt` was written."""


class TrainingCheckpoint(Checkpoint):
    """Writes `<dirpath>/last.ckpt` at every epoch end and stops at the first safe point after a signal.

    A Checkpoint, so that Lightning calls its epoch-end hook after the LightningModule's. With
    several processes, the ranks agree to stop on logging steps and at epoch ends only, so that
    no step waits for the others (a grace period is far longer than `log_every_n_steps` steps).
    On SLURM, a SIGUSR1 (the time limit's warning) also requeues the job after the save; the
    requeued job goes on from `last.ckpt` in the same folder (lm/resume.py).
    """

    def __init__(self, dirpath: str, requeue_command: str = "scontrol requeue") -> None:
        self.dirpath = Path(dirpath)
        self.requeue_command = requeue_command
        self.signal: int | None = None  # the first stop signal received, by any stage
        self._validation_metrics: dict[str, torch.Tensor] = {}  # from the checkpoint resumed
        self._previous: dict[int, object] = {}

    @property
    def last_path(self) -> Path:
        return self.dirpath / "last.ckpt"

    # --- signals: a flag, nothing else -------------------------------------------------------------
    def _note(self, signum: int, frame: object) -> None:
        if self.signal is None:
            self.signal = signum

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
        self._install()

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()
        if self._validation_metrics:  # the validation logged before the stop, which the epoch end ranks
            trainer.callback_metrics.update(self._validation_metrics)
            self._validation_metrics = {}
        if trainer.is_global_zero:  # what a killed save left behind
            for partial in self.dirpath.glob(".last.ckpt.partial-*"):
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
        epoch_loop = trainer.fit_loop.epoch_loop
        # Private, but the loop's own answers to "does a validation follow this step" (a checkpoint
        # taken before it would resume past a validation that never ran) and "are gradients being
        # accumulated" (they are not in a checkpoint).
        validation_follows = epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher)
        if (
            epoch_loop.batch_progress.is_last_batch
            or validation_follows
            or epoch_loop._is_training_done
            or epoch_loop._should_accumulate()
        ):
            return  # the epoch's end, the validation or the step comes first; the flag waits for it
        if trainer.world_size > 1 and (trainer.global_step % trainer.log_every_n_steps):
            return
        if self._stop_requested(trainer):
            pl_module.check_weights_finite()  # on a GPU the loss is checked on logging steps only
            self._save_last(trainer)
            # This step's logged values: Lightning writes them after this hook, which the stop skips.
            trainer._logger_connector.update_train_step_metrics()
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
        job = os.environ["SLURM_JOB_ID"]
        if "SLURM_ARRAY_JOB_ID" in os.environ:
            job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        try:
            result = subprocess.run([*self.requeue_command.split(), job], capture_output=True, text=True)
        except OSError as error:  # no scontrol on this node's PATH
            return f"; requeueing SLURM job {job} failed ({error}): resume it with resume="
        if result.returncode:
            return f"; requeueing SLURM job {job} failed ({result.stderr.strip() or result.returncode})"
        return f"; requeued SLURM job {job}"

    def _save_last(self, trainer: L.Trainer) -> None:
        """`trainer.save_checkpoint` on every rank (it gathers), written by rank 0 to a temporary file
        beside `last.ckpt` and renamed: a rename within one folder is atomic, a copy across
        filesystems (Lightning's own write) is not."""
        partial = self.dirpath / f".last.ckpt.partial-{os.getpid()}"
        trainer.save_checkpoint(partial)
        if trainer.is_global_zero:
            with open(partial, "rb") as file:
                os.fsync(file.fileno())
            os.replace(partial, self.last_path)
        trainer.strategy.barrier("last.ckpt")

    # --- the last validation's values, and the random generators --------------------------------
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # With validations inside the epoch, the epoch's end ranks the best checkpoint by the last
        # one; Lightning keeps logged values in memory only.
        checkpoint["validation_metrics"] = {
            key: value.cpu() for key, value in trainer.callback_metrics.items() if key.startswith("val/")
        }

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._validation_metrics = checkpoint.get("validation_metrics", {})

    def state_dict(self) -> dict:
        # Tensors and plain values only, which torch.load(weights_only=True) accepts.
        name, keys, position, has_gauss, gauss = np.random.get_state()
        state = {
            "torch": torch.get_rng_state(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss),
            "python": random.getstate(),
        }
        if torch.cuda.is_initialized():  # this process's GPU; every rank starts from the same seed
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        torch.set_rng_state(state_dict["torch"])
        name, keys, position, has_gauss, gauss = state_dict["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
        random.setstate(state_dict["python"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state(state_dict["cuda"])


class BestCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose best scores survive a moved run folder.

    Lightning drops them when the saved `dirpath` differs from today's, and then writes a best
    checkpoint over a better one; the paths are rebased onto the folder the run is in now.
    """

    def load_state_dict(self, state_dict: dict) -> None:
        then, now = state_dict.get("dirpath"), self.dirpath
        if then and now and then != now:

            def moved(path: str) -> str:
                return os.path.join(now, os.path.relpath(path, then)) if path else path

            state_dict = {
                **state_dict,
                "dirpath": now,
                "best_model_path": moved(state_dict["best_model_path"]),
                "kth_best_model_path": moved(state_dict.get("kth_best_model_path", "")),
                "last_model_path": moved(state_dict.get("last_model_path", "")),
                "best_k_models": {moved(p): v for p, v in state_dict.get("best_k_models", {}).items()},
            }
        super().load_state_dict(state_dict)
