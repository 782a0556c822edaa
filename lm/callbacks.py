"""Callbacks: training throughput, random state in checkpoints, preemption."""

import random
import signal
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException


class TokensPerSecond(L.Callback):
    """Logs train tokens/s every `log_every_n_steps` and per epoch, validation time excluded.

    Lightning's ThroughputMonitor synchronises the GPU after every step; this one only reads the
    clock, so it adds no host synchronisation and is exact over an epoch. It writes to the
    loggers directly: the value is already global (tokens of all ranks) and needs no reduction.
    """

    def __init__(self) -> None:
        self.total_tokens = 0  # over all ranks
        self.total_seconds = 0.0  # training only
        self._started: float | None = None  # the clock runs between _resume and _pause
        self._epoch_start = self._interval_start = (0, 0.0)  # (tokens, seconds) at those points

    @property
    def tokens_per_sec(self) -> float:
        return self.total_tokens / self.total_seconds if self.total_seconds else 0.0

    def state_dict(self) -> dict[str, float]:
        return {"total_tokens": self.total_tokens, "total_seconds": self.total_seconds}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self.total_tokens, self.total_seconds = state_dict["total_tokens"], state_dict["total_seconds"]

    def _seconds(self) -> float:
        running = time.perf_counter() - self._started if self._started is not None else 0.0
        return self.total_seconds + running

    def _resume(self) -> None:
        self._started = time.perf_counter()

    def _pause(self) -> None:
        self.total_seconds = self._seconds()
        self._started = None

    def _log_rate(self, trainer: L.Trainer, name: str, since: tuple[int, float]) -> tuple[int, float]:
        now = (self.total_tokens, self._seconds())
        if now[1] > since[1]:
            for logger in trainer.loggers:
                logger.log_metrics(
                    {name: (now[0] - since[0]) / (now[1] - since[1])}, step=trainer.global_step
                )
        return now

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = self._interval_start = (self.total_tokens, self.total_seconds)
        self._resume()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx
    ) -> None:
        if self._started is None:  # after a validation, and whatever was saved after it
            self._resume()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx
    ) -> None:
        self.total_tokens += batch[0].numel() * trainer.world_size  # a batch holds one rank's rows
        if trainer.global_step % trainer.log_every_n_steps == 0:
            self._interval_start = self._log_rate(
                trainer, "throughput/train_tokens_per_sec", self._interval_start
            )

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pause()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pause()
        self._log_rate(trainer, "throughput/epoch_tokens_per_sec", self._epoch_start)


class RandomState(L.Callback):
    """Saves the random generators in checkpoints and restores them on resume.

    Lightning's checkpoints leave them out; without them a resumed run draws other dropout masks
    than the run that never stopped.
    """

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


class Preempted(Exception):
    """Raised after the checkpoint of a SIGTERM / SIGUSR1 has been written."""


class Preemption(L.Callback):
    """On SIGTERM or SIGUSR1, save `checkpoints/last.ckpt` after the current step and stop.

    Lightning 2.6 only stops at the end of the epoch on SIGTERM, too late for a preemption's
    grace period. The handler only sets a flag; the checkpoint is written between two steps, where
    the weights, optimiser, carried state, data position and random state agree. On SLURM,
    Lightning's own SIGUSR1 handler (save and requeue) is kept.
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        signals = [signal.SIGTERM] if SLURMEnvironment.detect() else [signal.SIGTERM, signal.SIGUSR1]
        for signum in signals:
            self._previous[signum] = signal.signal(signum, self._note)

    def _note(self, signum: int, frame: object) -> None:
        self.signal = signum
        previous = self._previous.get(signum)
        if callable(previous):  # Lightning's: forwards the signal to the other local ranks
            previous(signum, frame)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx
    ) -> None:
        # After an epoch's last step the epoch ends first (validation, its checkpoint): a
        # checkpoint taken here would resume as an ended epoch that had skipped its validation.
        if not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._stop_if_asked(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_if_asked(trainer, epoch_end=True)  # a signal during the last step or the validation

    def _stop_if_asked(self, trainer: L.Trainer, epoch_end: bool = False) -> None:
        requested = self.signal is not None
        if trainer.world_size > 1:
            # Every rank must stop at the same step. Agreeing costs a collective and a host sync,
            # so ranks only compare notes on logging steps and at epoch ends (a preemption's
            # grace period is far longer than log_every_n_steps steps).
            if not epoch_end and (trainer.global_step + 1) % trainer.log_every_n_steps:
                return
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if requested:
            path = Path(trainer.checkpoint_callback.dirpath) / "last.ckpt"
            trainer.save_checkpoint(path)
            name = signal.Signals(self.signal or signal.SIGTERM).name
            raise Preempted(f"{name} at step {trainer.global_step}: saved {path}")

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        # Lightning's own SIGTERM stop (at an epoch's end; with several processes, at the next
        # step) came first: save there too, between two steps as well.
        if isinstance(exception, SIGTERMException) and trainer.checkpoint_callback:
            trainer.save_checkpoint(Path(trainer.checkpoint_callback.dirpath) / "last.ckpt")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
