"""Dynamic evaluation (Krause et al. 2018): the weights adapt to the text as it is scored.

The text is read as one stream (batch 1) in segments of `segment_length` tokens (5 in the paper
on PTB). Each segment is first scored with the current weights, and that score is the one that
counts; then the weights take one gradient step on the segment's loss (its mean NLL per token). A
target therefore never shapes its own score or an earlier one. The LSTM state flows across
segments, detached. Dropout stays off (evaluation mode) while gradients are taken, as in the
paper's code. With the cache (lm/evaluation/cache.py) as well, the adapted model's prediction is the one the
cache mixes with.

With theta0 the trained weights, g the gradient and lambda = `decay`, one step is

    sgd: theta <- theta - lr * g + lambda * (theta0 - theta)
    rms: theta <- theta - lr * g / (sqrt(MS) + eps) + min(lambda * RMS_norm, 1) * (theta0 - theta),
         RMS_norm = sqrt(MS) / mean(sqrt(MS)),

each weight on its own, both terms taken at the same theta. MS is each weight's mean squared
gradient over windows of the training data, measured once with theta0 before adapting
(`gradient_mean_squares`). The RMS rule divides the step by the RMS gradient, and pulls each weight
back toward theta0 in proportion to its RMS gradient normalised by the mean RMS over all the
network's weights, so that lambda is the average decay rate; a rate above 1 would overshoot
theta0, so it is clipped at 1. (The paper's released code takes the mean over weight tensors of
each tensor's mean RMS instead, every tensor counting alike: a constant factor, which the tuned
lambda absorbs.)
"""

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lm.data.windows import WindowDataset, batchify
from lm.errors import UserError
from lm.models.network import map_state
from lm.options import above, at_least, between, option, problems


@dataclass(frozen=True)
class DynamicEvalOptions:
    """evaluate.py's dynamic_eval.*, off by default. Recommended values, tuned on PTB's valid split:
    model=small sgd 0.1 or rms 3e-5; awd_cpu rms 2e-5 with the cache (docs/evaluation.md)."""

    method: Literal["sgd", "rms"] | None = option(None)
    """null (off), sgd, or rms (the step divided by the RMS gradient of the training data)."""
    lr: float | None = option(None, at_least(0))
    """The step on each segment's mean NLL per token; a method needs one."""
    decay: float = option(0.0, between(0, 1))
    """lambda: each step's pull back toward the trained weights (PTB small: 0; any decay hurt)."""
    segment_length: int = option(5, at_least(1))
    """Tokens per segment, one step after each (it changes the result): the paper's PTB setting."""
    eps: float = option(2e-5, above(0))
    """rms: added to the RMS gradient before dividing by it; the paper code's value, kept in tuning."""
    stats_batches: int | None = option(200, at_least(1))
    """rms: training windows that measure the mean squared gradients; null: all (PTB: no better)."""
    stats_batch_size: int = option(100, at_least(1))
    """rms: the streams of those windows (the paper code's)."""
    stats_num_steps: int = option(5, at_least(1))
    """rms: their length in tokens."""

    def used(self) -> dict | None:
        """The options the method used (sgd has no statistics), for evaluation.json; None when off."""
        if self.method is None:
            return None
        rms_only = ("eps", "stats_batches", "stats_batch_size", "stats_num_steps")
        return {k: v for k, v in asdict(self).items() if self.method == "rms" or k not in rms_only}


def dynamic_eval_problems(values: Mapping) -> list[str]:
    """Every problem of the dynamic_eval.* node, one line each."""
    lines = problems(DynamicEvalOptions, values, "dynamic_eval")
    if not lines and values.get("method") is not None and values.get("lr") is None:
        lines.append(
            f"dynamic_eval.lr has no value; dynamic_eval.method={values['method']} needs a step size, "
            "e.g. dynamic_eval.lr=... as recommended in docs/evaluation.md."
        )
    return lines


@contextmanager
def gradients_in_eval_mode() -> Iterator[None]:
    """Gradients of a network in evaluation mode (no dropout). cuDNN's LSTM refuses a backward
    pass outside training mode, so PyTorch's own kernels run instead."""
    with torch.enable_grad(), torch.backends.cudnn.flags(enabled=False):
        yield


def gradient_mean_squares(
    net: nn.Module,
    train_ids: torch.Tensor,
    batches: int | None,
    batch_size: int,
    num_steps: int,
    device: torch.device,
) -> list[torch.Tensor]:
    """MS of the RMS rule: each parameter's squared gradient of the mean NLL per token, averaged
    over the first `batches` windows (all when None) of the training data read as in training
    (`batch_size` streams, state carried), at the trained weights."""
    windows = WindowDataset(batchify(train_ids, batch_size), num_steps, full_windows_only=True)
    if len(windows) == 0:
        raise UserError(
            f"The training data ({len(train_ids)} tokens) holds no window of dynamic_eval.stats_batch_size="
            f"{batch_size} x dynamic_eval.stats_num_steps={num_steps}; make them smaller."
        )
    count = len(windows) if batches is None else min(batches, len(windows))
    parameters = list(net.parameters())
    mean_squares = [torch.zeros_like(p) for p in parameters]
    state = None
    with gradients_in_eval_mode():
        for i in range(count):
            x, y = (t.to(device) for t in windows[i])
            logits, state = net(x, state)
            state = map_state(torch.Tensor.detach, state)
            grads = torch.autograd.grad(F.cross_entropy(logits.flatten(0, 1), y.flatten()), parameters)
            for mean_square, grad in zip(mean_squares, grads, strict=True):
                mean_square.addcmul_(grad, grad, value=1 / count)
    return mean_squares


class DynamicEvaluation:
    """The weights' side of dynamic evaluation: `learn` takes one step of the method's rule on a
    segment's loss once the segment has been scored (lm/evaluation/scoring.py's `score_stream` reads the
    stream), and `adapting` gives the network its trained weights back when the pass ends."""

    def __init__(
        self,
        net: nn.Module,
        method: str,
        lr: float,
        decay: float,
        segment_length: int,
        mean_squares: list[torch.Tensor] | None = None,
        eps: float = 0.0,
    ):
        self.segment_length, self.lr = segment_length, lr
        self.parameters = list(net.parameters())
        self.trained = [p.detach().clone() for p in self.parameters]
        self.decay_rates: float | list[torch.Tensor] = decay
        self.step_sizes: list[torch.Tensor] | None = None  # sgd: lr for every weight
        if method == "rms":
            rms = [mean_square.sqrt() for mean_square in mean_squares]
            mean_rms = sum(r.sum() for r in rms) / sum(r.numel() for r in rms)
            self.decay_rates = [(decay * r / mean_rms).clamp(max=1.0) for r in rms]
            self.step_sizes = [lr / (r + eps) for r in rms]
        # With no decay the pull toward theta0 is p + 0 * (theta0 - p) = p: a pass over every
        # weight per segment that changes nothing, skipped.
        self.decays = decay > 0
        embedding, decoder = net.embedding, getattr(net, "decoder", None)
        tied = decoder is not None and decoder.weight is embedding.weight
        # An untied embedding's gradient is nonzero only in the rows of the segment's words. Made
        # sparse, the backward writes those rows instead of zeroing and filling a dense
        # (vocabulary, size) matrix, and the step touches only them. Tied, the decoder's share of
        # the gradient is dense anyway.
        self.sparse_embedding = None if tied else embedding
        # sgd with an untied full softmax: the decoder's weight gradient is d_logits^T h, of rank
        # segment_length; added straight into the weight (addmm_), it is never written out and
        # read back (8 MB each way on PTB). A forward hook keeps the decoder's input and output,
        # so the scorer knows nothing of it. (Measured: 0.85 of the time of the plain step.)
        self.decoder = decoder if decoder is not None and not tied and method == "sgd" else None
        self.decoder_io: tuple[torch.Tensor, torch.Tensor] | None = None
        decoder_weights = [] if self.decoder is None else list(self.decoder.parameters())
        self.learned = [p for p in self.parameters if all(p is not q for q in decoder_weights)]  # by autograd

    @contextmanager
    def adapting(self) -> Iterator[None]:
        """Gradients in evaluation mode, the embedding's sparse; afterwards the trained weights."""
        hook = None
        try:
            if self.sparse_embedding is not None:
                self.sparse_embedding.sparse = True
            if self.decoder is not None:
                hook = self.decoder.register_forward_hook(self._keep_decoder_io)
            with gradients_in_eval_mode():
                yield
        finally:
            if self.sparse_embedding is not None:
                self.sparse_embedding.sparse = False
            if hook is not None:
                hook.remove()
            self.decoder_io = None
            with torch.no_grad():
                torch._foreach_copy_(self.parameters, self.trained)

    def _keep_decoder_io(self, decoder: nn.Module, inputs: tuple[torch.Tensor], logits: torch.Tensor) -> None:
        self.decoder_io = (inputs[0], logits)

    @torch.no_grad()
    def learn(self, loss: torch.Tensor) -> None:
        """One step of the method on a segment's loss (its mean NLL per token), in place: the pull
        toward theta0, then the gradient step taken at the same theta (the step does not read
        theta). Fused over the weights with torch's `_foreach_` kernels: one call per rule rather
        than a few per weight tensor, which in a batch-1 loop is mostly Python's overhead."""
        inputs = self.learned if self.decoder is None else [*self.learned, self.decoder_io[1]]
        # allow_unused: an adaptive softmax's tail cluster that no target of the segment falls in.
        grads = list(torch.autograd.grad(loss, inputs, allow_unused=True))
        if self.decays:
            torch._foreach_lerp_(self.parameters, self.trained, self.decay_rates)
        if self.decoder is not None:
            features, d_logits = self.decoder_io[0].flatten(0, -2), grads.pop().flatten(0, -2)
            self.decoder.weight.addmm_(d_logits.T, features, alpha=-self.lr)
            self.decoder.bias.add_(d_logits.sum(0), alpha=-self.lr)
        dense = []  # the weights with a dense gradient, by index
        for i, grad in enumerate(grads):
            if grad is None:
                continue
            if not grad.is_sparse:
                dense.append(i)
                continue
            grad = grad.coalesce()  # the embedding: the segment's rows, a repeated word's summed
            rows, values = grad.indices()[0], grad.values()
            step = self.lr if self.step_sizes is None else self.step_sizes[i][rows]
            self.learned[i].index_add_(0, rows, values * step, alpha=-1)
        parameters, dense_grads = [self.learned[i] for i in dense], [grads[i] for i in dense]
        if self.step_sizes is None:
            torch._foreach_add_(parameters, dense_grads, alpha=-self.lr)
        else:  # rms: every weight is learned by autograd, so `learned` is `parameters`
            torch._foreach_addcmul_(parameters, dense_grads, [self.step_sizes[i] for i in dense], value=-1)
