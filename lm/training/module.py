"""Truncated-BPTT training and exact evaluation: the LightningModule (docs/design.md, "Model and
training" and "Perplexity")."""

import math
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch.optim import SGD
from torchmetrics import MeanMetric

from lm.data.vocabulary import Vocabulary
from lm.models.network import State, build_network, map_state
from lm.options import problems, refuse
from lm.training.averaging import WeightAveraging
from lm.training.checkpoint import load_module_state, save_module_state
from lm.training.lightning_private import attached_trainer
from lm.training.metrics import Perplexity, evaluation_scores, summed_nll
from lm.training.options import TrainingOptions
from lm.training.trainer import is_logging_step


class Diverged(Exception):
    """The training loss or the weights stopped being finite; nothing after that was saved."""

    def __init__(self, step: int, epoch: int, lr: float, what: str = "the training loss"):
        super().__init__(f"{what} is not finite at step {step} (epoch {epoch + 1}, lr {lr:g})")
        self.step, self.epoch, self.lr = step, epoch, lr


class LanguageModel(L.LightningModule):
    """Carries the network's state across windows, detached; evaluation keeps a state of its own.

    `net` is the network's options node (model.net, whose `_target_` names its options class), built
    into the network here, once the vocabulary's size is known; `options` are TrainingOptions'.
    """

    def __init__(self, vocab_size: int, net: Mapping[str, Any], **options: Any):
        super().__init__()
        net = OmegaConf.to_container(net, resolve=True) if isinstance(net, DictConfig) else dict(net)
        refuse(problems(TrainingOptions, options, "model"))
        self.save_hyperparameters({"vocab_size": vocab_size, "net": net, **options})
        self.options = TrainingOptions(**options)
        self.net = build_network(net, vocab_size)
        # The softmax and loss, compiled in setup() when asked.
        self.summed_nll, self.evaluation_scores = summed_nll, evaluation_scores
        self.vocabulary: Vocabulary | None = None  # from the datamodule; saved in every checkpoint
        self.run_config: dict | None = None  # train.py's whole configuration, saved likewise
        self.train_state: State | None = None
        self.eval_state: State | None = None
        self.averaging = WeightAveraging(self.options.asgd_nonmono)  # NT-ASGD; lm/training/averaging.py
        self.train_ppl, self.val_ppl, self.test_ppl = Perplexity(persistent=True), Perplexity(), Perplexity()
        # Per-token values, so an unweighted mean is exact; no NaN check, which would sync a GPU.
        self.val_acc, self.test_acc = MeanMetric(nan_strategy="disable"), MeanMetric(nan_strategy="disable")

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        return self.net(x, state)

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule if attached_trainer(self) else None
        if self.vocabulary is None and hasattr(datamodule, "vocabulary"):
            self.vocabulary = datamodule.vocabulary
        # torch.compile fuses the softmax and the loss, forward and backward. Not the network:
        # Dynamo skips any frame that calls nn.LSTM, so the LSTM stays eager (cuDNN on GPU).
        # Compiled here, in the process that trains: ddp_spawn cannot pickle a compiled function.
        if self.options.compile and self.summed_nll is summed_nll:
            self.summed_nll = torch.compile(summed_nll)
            self.evaluation_scores = torch.compile(evaluation_scores)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        save_module_state(self, checkpoint)  # lm/training/checkpoint.py: what a checkpoint holds

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        load_module_state(self, checkpoint)

    # --- training -------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        # A zero state at every epoch start. (Lightning does not call this hook when it resumes
        # in the middle of an epoch: the checkpoint's state and sums then go on.)
        self.train_state = None
        self.train_ppl.reset()  # a checkpoint taken after validation still holds the last epoch's sums

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.train_state is not None and self.train_state[0][0].device != x.device:  # loaded on the CPU
            self.train_state = map_state(lambda s: s.to(x.device), self.train_state)
        out, state = self.net.features(x, self.train_state)
        self.train_state = map_state(torch.Tensor.detach, state)  # truncated BPTT
        dropped = self.net.drop_output(out)
        nll = self.summed_nll(self.net, dropped, y)
        # "streams": summed over the time steps, averaged over the streams, the scale at which lr 1
        # and clipping at 5 reproduce Zaremba et al.; "tokens": the mean per target, AWD-LSTM's.
        per = x.size(0) if self.options.loss_average == "streams" else y.numel()
        loss = nll / per
        ar, tar = self.options.ar, self.options.tar
        if ar or tar:  # AWD-LSTM's activation and temporal activation regularisation
            regularisation = ar * dropped.pow(2).mean() + tar * (out[:, 1:] - out[:, :-1]).pow(2).mean()
            loss = loss + regularisation * (y.numel() / per)

        self._stop_if_diverged(nll)
        self.train_ppl.update(nll, y.numel())
        if self._logs_this_step():
            # Per token, comparable across num_steps; the mean over ranks is the global loss.
            self.log("train/loss", nll.detach() / y.numel(), sync_dist=True)
            self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"])  # this window's
            # Running perplexity of this epoch on this rank, without a cross-rank reduction.
            self.log("train/ppl", torch.exp(self.train_ppl.nll_sum / self.train_ppl.count), prog_bar=True)
        return loss

    def on_train_epoch_end(self) -> None:
        self.log("train/epoch_ppl", self.train_ppl)  # Lightning computes, reduces and resets it

    def learning_rate(self, epoch: int, num_steps: int) -> float:
        """lr for 0-based epoch e: lr0 * decay ** max(e + 1 - decay_after, 0), times length / num_steps
        for AWD-LSTM's variable windows.

        A function of the epoch and the window rather than a scheduler that Lightning steps after
        the epoch-end hooks: the lr is then right after a resume from any safe point.
        """
        o = self.options
        lr = o.lr * o.lr_decay ** max(epoch + 1 - o.decay_after, 0)
        datamodule = self.trainer.datamodule
        nominal = datamodule.options.num_steps if hasattr(datamodule, "options") else num_steps
        return lr * num_steps / nominal

    def on_train_batch_start(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        for group in self.trainer.optimizers[0].param_groups:
            group["lr"] = self.learning_rate(self.current_epoch, batch[0].size(1))

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.averaging.after_step(self.net)  # inside the step, so that no checkpoint falls in between

    def _stop_if_diverged(self, nll: torch.Tensor) -> None:
        """Raise Diverged, before the step is taken, when the loss is not finite.

        Checked every step in one CPU process; on a GPU, or with several processes (which must
        decide together, or one would hang), only on logging steps, where the loss is read back
        anyway, so that no step waits for the device or the other ranks.
        """
        if (self.device.type != "cpu" or self.trainer.world_size > 1) and not self._logs_this_step():
            return
        diverged = not bool(torch.isfinite(nll))
        if self.trainer.world_size > 1:
            diverged = self.trainer.strategy.reduce_boolean_decision(diverged, all=False)
        if diverged:
            raise Diverged(
                self.global_step, self.current_epoch, self.trainer.optimizers[0].param_groups[0]["lr"]
            )

    def on_validation_epoch_end(self) -> None:
        if self.trainer.state.fn != "fit":
            return
        # The loss shows bad weights a step (on a GPU up to log_every_n_steps) later; an epoch end
        # in between must not let the checkpoint callback save them as the last good ones.
        self.check_weights_finite()
        if not self.trainer.sanity_checking and self.averaging.enabled:
            self.averaging.after_validation(
                math.log(float(self.val_ppl.compute())), self.current_epoch, self.net
            )

    def check_weights_finite(self) -> None:
        """Raise Diverged when a weight is not finite: no checkpoint may keep them as the last good ones."""
        if not all(bool(torch.isfinite(p).all()) for p in self.net.parameters()):
            lr = self.trainer.optimizers[0].param_groups[0]["lr"]
            raise Diverged(self.global_step, self.current_epoch, lr, what="the weights")

    def _logs_this_step(self) -> bool:
        """A `self.log` call costs about 0.3 ms; made every step, the few here cost 2-3% of a CPU step."""
        return is_logging_step(self.trainer, self.global_step + 1)

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        # Lightning's own norm clipping does not report the norm; clipping here logs it for free.
        if gradient_clip_algorithm == "value":
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        max_norm = gradient_clip_val if gradient_clip_val else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), max_norm)
        if self._logs_this_step():
            self.log("train/grad_norm", norm)

    def configure_optimizers(self) -> SGD:
        # The lr is set before every step (`learning_rate`).
        return SGD(self.net.parameters(), lr=self.options.lr, weight_decay=self.options.weight_decay)

    # --- evaluation: state carried over the whole split, every target counted once -------------
    def on_validation_epoch_start(self) -> None:
        self.eval_state = None
        self.val_ppl.reset()
        self.val_acc.reset()

    def on_test_epoch_start(self) -> None:
        self.eval_state = None
        self.test_ppl.reset()
        self.test_acc.reset()

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_ppl, self.val_acc)
        self.log("val/ppl", self.val_ppl, prog_bar=True)
        self.log("val/acc", self.val_acc)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_ppl, self.test_acc)
        self.log("test/ppl", self.test_ppl)
        self.log("test/acc", self.test_acc)

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], ppl: Perplexity, acc: MeanMetric) -> None:
        x, y = batch
        net = self.averaging.evaluated(self.net)  # NT-ASGD: the average, once there is one
        out, self.eval_state = net.features(x, self.eval_state)
        nll, correct = self.evaluation_scores(net, net.drop_output(out), y)
        ppl.update(nll, y.numel())
        acc.update(correct.flatten())
