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

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from lm.data.windows import WindowDataset, batchify
from lm.errors import UserError, check_rules
from lm.models.network import map_state

METHODS = ("sgd", "rms")
RMS_OPTIONS = ("eps", "stats_batches", "stats_batch_size", "stats_num_steps")  # unused by sgd


def check_options(
    method, lr, decay, segment_length, eps, stats_batches, stats_batch_size, stats_num_steps, **_
) -> None:
    """One clear error, naming the `dynamic_eval.` key, before any work."""
    if method not in (None, *METHODS):
        raise UserError(f"dynamic_eval.method={method!r} is not a method; use sgd, rms, or null (off).")
    if method is None:
        return
    if lr is None:
        raise UserError(
            f"dynamic_eval.lr has no value; dynamic_eval.method={method} needs a step size, e.g. "
            "dynamic_eval.lr=... as recommended in conf/evaluate.yaml."
        )

    def number(value) -> bool:
        return isinstance(value, int | float)

    def count(value) -> bool:
        return isinstance(value, int) and value >= 1

    rules = [
        ("lr", lr, number(lr) and lr >= 0, "a number, 0 or more"),
        ("decay", decay, number(decay) and 0 <= decay <= 1, "a number in [0, 1]"),
        ("segment_length", segment_length, count(segment_length), "an integer, 1 or more"),
    ]
    if method == "rms":
        rules += [
            ("eps", eps, number(eps) and eps > 0, "a number above 0"),
            (
                "stats_batches",
                stats_batches,
                stats_batches is None or count(stats_batches),
                "null (all) or 1 or more",
            ),
            ("stats_batch_size", stats_batch_size, count(stats_batch_size), "an integer, 1 or more"),
            ("stats_num_steps", stats_num_steps, count(stats_num_steps), "an integer, 1 or more"),
        ]
    check_rules("dynamic_eval", rules)


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
