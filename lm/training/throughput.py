"""Training throughput without host synchronisation."""

import time

import lightning as L

from lm.training.trainer import is_logging_step


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
        return {"total_tokens": self.total_tokens, "total_seconds": self._seconds()}  # the epoch's so far too

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
        if is_logging_step(trainer, trainer.global_step):
            self._interval_start = self._log_rate(
                trainer, "throughput/train_tokens_per_sec", self._interval_start
            )

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pause()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pause()
        self._log_rate(trainer, "throughput/epoch_tokens_per_sec", self._epoch_start)
