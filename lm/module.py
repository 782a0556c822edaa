"""Truncated-BPTT training and exact evaluation of the LSTM LM (design.md, "Model and training")."""

import logging
import math
from collections.abc import Sequence
from itertools import pairwise

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import ListConfig, OmegaConf
from torch.optim import SGD
from torch.optim.swa_utils import AveragedModel
from torchmetrics import MeanMetric, Metric

from lm.corpus import Vocabulary
from lm.errors import UserError, check_rules
from lm.model import LSTMLanguageModel, State, map_state

log = logging.getLogger(__name__)


class Perplexity(Metric):
    """exp(summed NLL / number of targets), both sums kept in float64 and summed over ranks.

    Never a mean of per-window perplexities or losses: windows differ in size (design.md).
    """

    full_state_update = False

    def __init__(self, persistent: bool = False) -> None:
        super().__init__()
        # Persistent for training only: a run resumed mid-epoch goes on with the epoch's sums so
        # far; an evaluation starts from zero every time and saves nothing.
        zero = torch.tensor(0.0, dtype=torch.float64)
        self.add_state("nll_sum", zero.clone(), dist_reduce_fx="sum", persistent=persistent)
        self.add_state("count", zero.clone(), dist_reduce_fx="sum", persistent=persistent)

    def update(self, nll_sum: torch.Tensor, count: int) -> None:
        self.nll_sum += nll_sum.detach()
        self.count += count

    def compute(self) -> torch.Tensor:
        return torch.exp(self.nll_sum / self.count)


def summed_nll(net: LSTMLanguageModel, features: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The training loss's sum: NLL of targets y (batch, steps) at the last layer's dropped outputs."""
    return negated_sum(net.target_log_probs(features, y))


def evaluation_scores(
    net: LSTMLanguageModel, features: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL of targets y (batch, steps), added in float64, and whether each was the likeliest
    token: the per-target values and sum of lm/scoring.py's `score_stream`, so that evaluate.py
    gives train.py's test perplexity to the last digits."""
    log_probs, likeliest = net.evaluate_targets(features, y)
    return -log_probs.double().sum(), likeliest == y


def negated_sum(log_probs: torch.Tensor) -> torch.Tensor:
    """-sum(log_probs), added up by nll_loss's own reduction: the one of F.cross_entropy(reduction=
    "sum"), so that a full softmax's training loss is PyTorch's usual one to the last bit."""
    flat = log_probs.reshape(-1, 1)
    return F.nll_loss(flat, flat.new_zeros(len(flat), dtype=torch.long), reduction="sum")


class Diverged(Exception):
    """The training loss or the weights stopped being finite; nothing after that was saved."""

    def __init__(self, step: int, epoch: int, lr: float, what: str = "the training loss"):
        super().__init__(f"{what} is not finite at step {step} (epoch {epoch + 1}, lr {lr:g})")
        self.step, self.epoch, self.lr = step, epoch, lr


def check_options(
    hidden_size,
    num_layers,
    dropout,
    init_scale,
    lr,
    lr_decay,
    decay_after,
    embedding_size,
    input_dropout,
    hidden_dropout,
    output_dropout,
    embedding_dropout,
    weight_drop,
    init,
    ar,
    tar,
    weight_decay,
    loss_average,
    asgd_nonmono,
    tie_weights,
    softmax,
    cutoffs,
    div_value,
    vocab_size=None,
    **_,
) -> None:
    """One clear error, before any work, for a value the model cannot train with; the cutoffs
    against the vocabulary once its size is known (the module's __init__)."""
    rules = [
        (
            "hidden_size",
            hidden_size,
            isinstance(hidden_size, int) and hidden_size >= 1,
            "an integer, 1 or more",
        ),
        ("num_layers", num_layers, isinstance(num_layers, int) and num_layers >= 1, "an integer, 1 or more"),
        ("dropout", dropout, isinstance(dropout, int | float) and 0 <= dropout < 1, "a number in [0, 1)"),
        (
            "init_scale",
            init_scale,
            isinstance(init_scale, int | float) and init_scale > 0,
            "a number above 0",
        ),
        ("lr", lr, isinstance(lr, int | float) and lr >= 0, "a number, 0 or more"),
        ("lr_decay", lr_decay, isinstance(lr_decay, int | float) and lr_decay > 0, "a number above 0"),
        (
            "decay_after",
            decay_after,
            isinstance(decay_after, int) and decay_after >= 0,
            "an integer, 0 or more",
        ),
        (
            "embedding_size",
            embedding_size,
            embedding_size is None or isinstance(embedding_size, int) and embedding_size >= 1,
            "null (hidden_size) or an integer, 1 or more",
        ),
        *(
            (key, value, isinstance(value, int | float) and 0 <= value < 1, "a number in [0, 1)")
            for key, value in [
                ("input_dropout", input_dropout),
                ("hidden_dropout", hidden_dropout),
                ("output_dropout", output_dropout),
                ("embedding_dropout", embedding_dropout),
                ("weight_drop", weight_drop),
            ]
        ),
        ("init", init, init in ("uniform", "awd"), "uniform or awd"),
        *(
            (key, value, isinstance(value, int | float) and value >= 0, "a number, 0 or more")
            for key, value in [("ar", ar), ("tar", tar), ("weight_decay", weight_decay)]
        ),
        ("loss_average", loss_average, loss_average in ("streams", "tokens"), "streams or tokens"),
        (
            "asgd_nonmono",
            asgd_nonmono,
            asgd_nonmono is None or isinstance(asgd_nonmono, int) and asgd_nonmono >= 1,
            "null (plain SGD) or an integer, 1 or more",
        ),
        ("softmax", softmax, softmax in ("full", "adaptive"), "full or adaptive"),
        ("div_value", div_value, isinstance(div_value, int | float) and div_value > 0, "a number above 0"),
    ]
    if softmax == "adaptive":
        limit = "" if vocab_size is None else f" and below the vocabulary size ({vocab_size})"
        allowed = f"a strictly increasing list of integers, each 1 or more{limit}, such as [2000,5000]"
        rules.append(("cutoffs", cutoffs, _cutoffs_valid(cutoffs, vocab_size), allowed))
    else:
        allowed = "null with model.softmax=full; set model.softmax=adaptive to use them"
        rules.append(("cutoffs", cutoffs, cutoffs is None, allowed))
    check_rules("model", rules)
    if softmax == "adaptive" and hidden_size // div_value ** len(cutoffs) < 1:
        raise UserError(
            f"model.div_value={div_value} leaves the last of {len(cutoffs)} tail clusters no projection "
            f"(model.hidden_size {hidden_size} // {div_value} ** {len(cutoffs)} = 0 units): lower "
            "model.div_value or give fewer model.cutoffs."
        )
    if softmax == "adaptive" and tie_weights:
        raise UserError(
            "model.tie_weights=true is not allowed with model.softmax=adaptive: its projections cannot "
            "share the embedding matrix; set model.tie_weights=false or model.softmax=full."
        )


def _cutoffs_valid(cutoffs, vocab_size: int | None) -> bool:
    """A list (or Hydra's ListConfig) of integers 1 <= c_1 < c_2 < ... < vocab_size."""
    if not isinstance(cutoffs, Sequence) or isinstance(cutoffs, str) or len(cutoffs) == 0:
        return False
    if not all(isinstance(c, int) and not isinstance(c, bool) for c in cutoffs):
        return False
    increasing = cutoffs[0] >= 1 and all(a < b for a, b in pairwise(cutoffs))
    return increasing and (vocab_size is None or cutoffs[-1] < vocab_size)


class LanguageModel(L.LightningModule):
    """Carries the LSTM state across windows, detached; evaluation keeps a state of its own."""

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int = 200,
        num_layers: int = 2,
        dropout: float = 0.0,
        init_scale: float = 0.1,
        tie_weights: bool = False,
        lr: float = 1.0,
        lr_decay: float = 0.5,
        decay_after: int = 4,
        compile: bool = False,
        embedding_size: int | None = None,
        input_dropout: float = 0.0,
        hidden_dropout: float = 0.0,
        output_dropout: float = 0.0,
        embedding_dropout: float = 0.0,
        weight_drop: float = 0.0,
        init: str = "uniform",
        ar: float = 0.0,
        tar: float = 0.0,
        weight_decay: float = 0.0,
        loss_average: str = "streams",
        asgd_nonmono: int | None = None,
        softmax: str = "full",
        cutoffs: list[int] | None = None,
        div_value: float = 4.0,
    ):
        super().__init__()
        if isinstance(cutoffs, ListConfig):  # from Hydra: saved as a plain list, as every other value
            cutoffs = OmegaConf.to_container(cutoffs)
        self.save_hyperparameters()
        check_options(**self.hparams)
        self.net = LSTMLanguageModel(
            vocab_size,
            hidden_size,
            num_layers,
            dropout,
            init_scale,
            tie_weights,
            embedding_size=embedding_size,
            input_dropout=input_dropout,
            hidden_dropout=hidden_dropout,
            output_dropout=output_dropout,
            embedding_dropout=embedding_dropout,
            weight_drop=weight_drop,
            init=init,
            softmax=softmax,
            cutoffs=cutoffs,
            div_value=div_value,
        )
        # The softmax and loss, compiled in setup() when asked.
        self.summed_nll, self.evaluation_scores = summed_nll, evaluation_scores
        self.vocabulary: Vocabulary | None = None  # from the datamodule; saved in every checkpoint
        self.run_config: dict | None = None  # train.py's whole configuration, saved likewise
        self.train_state: State | None = None
        self.eval_state: State | None = None
        # Non-monotonically triggered ASGD (Merity et al. 2017): the validation losses so far, the
        # epoch from which the weights are averaged (None: not yet), and their average, a frozen
        # copy of the network (the optimiser and DDP see the raw weights only).
        self.val_losses: list[float] = []
        self.averaging_since: int | None = None
        self.averaged: AveragedModel | None = None
        self.train_ppl, self.val_ppl, self.test_ppl = Perplexity(persistent=True), Perplexity(), Perplexity()
        # Per-token values, so an unweighted mean is exact; no NaN check, which would sync a GPU.
        self.val_acc, self.test_acc = MeanMetric(nan_strategy="disable"), MeanMetric(nan_strategy="disable")

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        return self.net(x, state)

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule if self._trainer else None
        if self.vocabulary is None and hasattr(datamodule, "vocabulary"):
            self.vocabulary = datamodule.vocabulary
        # torch.compile fuses the softmax and the loss, forward and backward. Not the network:
        # Dynamo skips any frame that calls nn.LSTM, so the LSTM stays eager (cuDNN on GPU).
        # Compiled here, in the process that trains: ddp_spawn cannot pickle a compiled function.
        if self.hparams.compile and self.summed_nll is summed_nll:
            self.summed_nll = torch.compile(summed_nll)
            self.evaluation_scores = torch.compile(evaluation_scores)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.vocabulary is not None:
            checkpoint["vocabulary"] = self.vocabulary.state_dict()
        checkpoint["train_state"] = self._all_ranks_state()  # the carried state, for a mid-epoch resume
        if self._trainer is not None and self.trainer.world_size > 1:  # each rank's sums of the epoch so far
            sums = torch.stack([self.train_ppl.nll_sum, self.train_ppl.count])
            checkpoint["train_ppl_by_rank"] = self.all_gather(sums)  # (ranks, 2)
        if self.run_config is not None:
            checkpoint["run_config"] = self.run_config
        checkpoint["asgd"] = {"val_losses": self.val_losses, "averaging_since": self.averaging_since}
        if self.averaged is not None:  # the average is the model; training goes on from the raw weights
            checkpoint["training_state_dict"] = checkpoint["state_dict"]
            checkpoint["state_dict"] = {f"net.{k}": v for k, v in self.averaged.module.state_dict().items()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        if "vocabulary" in checkpoint:
            saved = Vocabulary.from_state_dict(checkpoint["vocabulary"])
            if fitting and self.vocabulary is not None and saved != self.vocabulary:
                raise UserError(
                    f"resume: the checkpoint's vocabulary ({len(saved)} types) is not the one of the data "
                    f"now ({len(self.vocabulary)}): data.dir or its files changed since the run began. "
                    "Resume with the run's own data, or start a new run."
                )
            self.vocabulary = saved
        _upgrade(checkpoint)
        asgd = checkpoint.get("asgd", {})
        self.val_losses = list(asgd.get("val_losses", []))
        self.averaging_since = asgd.get("averaging_since")
        self.averaged = None  # outside training, the averaged weights already are the model
        if fitting and "training_state_dict" in checkpoint:
            checkpoint["state_dict"] = checkpoint["training_state_dict"]
            self.averaged = average_of(self.net)
        self._restore_training_sums(checkpoint)
        state = checkpoint.get("train_state")
        if state is not None and self._trainer is not None and self.trainer.world_size > 1:
            rows = state[0][0].size(1) // self.trainer.world_size  # this rank's streams
            first = self.trainer.global_rank * rows
            state = map_state(lambda s: s[:, first : first + rows], state)
        self.train_state = state

    def _restore_training_sums(self, checkpoint: dict) -> None:
        """This rank's training sums: its own when the process count is the one saved, else the
        total on rank 0 (the epoch's perplexity is their sum over ranks either way)."""
        by_rank = checkpoint.get("train_ppl_by_rank")
        if by_rank is None:
            return  # one process saved it: the module's own state_dict holds the sums
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self._trainer else (1, 0)
        if by_rank.size(0) == world:
            sums = by_rank[rank]
        else:
            sums = by_rank.sum(0) if rank == 0 else torch.zeros_like(by_rank[0])
        checkpoint["state_dict"]["train_ppl.nll_sum"], checkpoint["state_dict"]["train_ppl.count"] = sums

    def _all_ranks_state(self) -> State | None:
        """The carried state of all streams: each rank holds its own rows (called on every rank)."""
        if self.train_state is None or self._trainer is None or self.trainer.world_size == 1:
            return self.train_state
        # all_gather: (ranks, layers, rows, size) -> (layers, ranks * rows, size)
        return map_state(lambda s: self.all_gather(s).transpose(0, 1).flatten(1, 2), self.train_state)

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
        out, state = self.net.hidden(x, self.train_state)
        self.train_state = map_state(torch.Tensor.detach, state)  # truncated BPTT
        dropped = self.net.drop_output(out)
        nll = self.summed_nll(self.net, dropped, y)
        # "streams": summed over the time steps, averaged over the streams, the scale at which lr 1
        # and clipping at 5 reproduce Zaremba et al.; "tokens": the mean per target, AWD-LSTM's.
        per = x.size(0) if self.hparams.loss_average == "streams" else y.numel()
        loss = nll / per
        hparams = self.hparams
        if hparams.ar or hparams.tar:  # AWD-LSTM's activation and temporal activation regularisation
            regularisation = (
                hparams.ar * dropped.pow(2).mean() + hparams.tar * (out[:, 1:] - out[:, :-1]).pow(2).mean()
            )
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
        hparams = self.hparams
        lr = hparams.lr * hparams.lr_decay ** max(epoch + 1 - hparams.decay_after, 0)
        nominal = getattr(self.trainer.datamodule, "num_steps", num_steps)
        return lr * num_steps / nominal

    def on_train_batch_start(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        for group in self.trainer.optimizers[0].param_groups:
            group["lr"] = self.learning_rate(self.current_epoch, batch[0].size(1))

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.averaged is not None:  # inside the step, so that no checkpoint falls in between
            self.averaged.update_parameters(self.net)

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
        if self.trainer.sanity_checking or self.hparams.asgd_nonmono is None:
            return
        loss = math.log(float(self.val_ppl.compute()))
        n = self.hparams.asgd_nonmono
        if self.averaging_since is None and len(self.val_losses) > n and loss > min(self.val_losses[:-n]):
            # No better than n epochs ago: average the weights from now on (NT-ASGD, Merity et al.);
            # the steps stay SGD's, the average is the mean of the weights after each step since.
            self.averaging_since = self.current_epoch
            self.averaged = average_of(self.net)
            log.info(
                "epoch %d: validation stopped improving; averaging the weights (ASGD)", self.current_epoch + 1
            )
        self.val_losses.append(loss)

    def check_weights_finite(self) -> None:
        """Raise Diverged when a weight is not finite: no checkpoint may keep them as the last good ones."""
        if not all(bool(torch.isfinite(p).all()) for p in self.net.parameters()):
            lr = self.trainer.optimizers[0].param_groups[0]["lr"]
            raise Diverged(self.global_step, self.current_epoch, lr, what="the weights")

    def _logs_this_step(self) -> bool:
        """True on the steps after which Lightning writes the logs (every `log_every_n_steps`).

        A `self.log` call costs about 0.3 ms; made every step, the few here cost 2-3% of a CPU step.
        """
        return (self.global_step + 1) % self.trainer.log_every_n_steps == 0

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
        return SGD(self.net.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

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
        net = self.averaged.module if self.averaged is not None else self.net  # NT-ASGD: the average
        out, self.eval_state = net.hidden(x, self.eval_state)
        nll, correct = self.evaluation_scores(net, net.drop_output(out), y)
        ppl.update(nll, y.numel())
        acc.update(correct.flatten())


def average_of(net: torch.nn.Module) -> AveragedModel:
    """A running mean of `net`'s weights, updated after every step; frozen, so that no optimiser or
    DDP takes it for weights to train."""
    return AveragedModel(net).requires_grad_(False)


def _upgrade(checkpoint: dict) -> None:
    """Checkpoints saved before the LSTM stack became a list: rename the weights, wrap the state."""
    weights = checkpoint.get("state_dict", {})
    for key in [key for key in weights if key.startswith("net.lstm.")]:
        weights[key.replace("net.lstm.", "net.rnns.0.")] = weights.pop(key)
    state = checkpoint.get("train_state")
    if isinstance(state, tuple):
        checkpoint["train_state"] = [state]
