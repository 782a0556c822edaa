"""Training throughput in tokens per second."""

import time

import lightning as L


class TokensPerSecond(L.Callback):
    """Logs train tokens/s every `log_every_n_steps` and per epoch, validation time excluded.

    Lightning's ThroughputMonitor synchronises the GPU after every step; this one only reads the
    clock, so the figure is exact over an epoch and adds no host synchronisation.
    """

    def __init__(self) -> None:
        self.total_tokens = 0
        self.total_seconds = 0.0
        self._started: float | None = None

    @property
    def tokens_per_sec(self) -> float:
        return self.total_tokens / self.total_seconds if self.total_seconds else 0.0

    def _elapsed(self) -> float:
        running = time.perf_counter() - self._started if self._started is not None else 0.0
        return self.total_seconds + running

    def _resume(self) -> None:
        self._started = time.perf_counter()

    def _pause(self) -> None:
        if self._started is not None:
            self.total_seconds += time.perf_counter() - self._started
            self._started = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = self._interval_start = (self.total_tokens, self.total_seconds)
        self._resume()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx
    ) -> None:
        self.total_tokens += batch[0].numel() * trainer.world_size  # batch holds this rank's rows
        if trainer.global_step % trainer.log_every_n_steps == 0:
            now = (self.total_tokens, self._elapsed())
            pl_module.log("throughput/train_tokens_per_sec", _rate(self._interval_start, now))
            self._interval_start = now

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pause()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.training and not trainer.sanity_checking:
            self._resume()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pause()
        pl_module.log(
            "throughput/epoch_tokens_per_sec",
            _rate(self._epoch_start, (self.total_tokens, self.total_seconds)),
        )


def _rate(start: tuple[int, float], end: tuple[int, float]) -> float:
    seconds = end[1] - start[1]
    return (end[0] - start[0]) / seconds if seconds > 0 else 0.0
