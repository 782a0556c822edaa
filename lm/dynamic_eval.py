"""Dynamic evaluation (Krause et al. 2018): the weights adapt to the text as it is scored.

The text is read as one stream (batch 1) in segments of `num_steps` tokens. Each segment is first
scored with the current weights, and that score is the one that counts; then the weights take one
gradient step on the segment's loss (its mean NLL per token). A target therefore never shapes its
own score or an earlier one. The LSTM state flows across segments, detached. Dropout stays off
(evaluation mode) while gradients are taken, as in the paper's code.

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

from lm.data import WindowDataset, batchify
from lm.errors import UserError, check_rules
from lm.model import map_state
from lm.scoring import stream_loader

METHODS = ("sgd", "rms")
RMS_OPTIONS = ("eps", "stats_batches", "stats_batch_size", "stats_num_steps")  # unused by sgd


def check_options(
    method, lr, decay, num_steps, eps, stats_batches, stats_batch_size, stats_num_steps, **_
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
        ("num_steps", num_steps, count(num_steps), "an integer, 1 or more"),
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


def dynamic_log_probs(
    net: nn.Module,
    ids: torch.Tensor,
    method: str,
    lr: float,
    decay: float,
    num_steps: int,
    device: torch.device,
    mean_squares: list[torch.Tensor] | None = None,
    eps: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability (float64) of each target of `ids` read as one stream, and whether it was
    the likeliest token, each scored before the weights adapt to it. `mean_squares` (from
    `gradient_mean_squares`) and `eps` are the `rms` method's. The weights are restored after."""
    parameters = list(net.parameters())
    trained = [p.detach().clone() for p in parameters]
    if method == "rms":
        rms = [mean_square.sqrt() for mean_square in mean_squares]
        mean_rms = sum(r.sum() for r in rms) / sum(r.numel() for r in rms)
        decay_rates = [(decay * r / mean_rms).clamp(max=1.0) for r in rms]
        step_sizes = [lr / (r + eps) for r in rms]
    else:
        decay_rates = [torch.tensor(decay, dtype=p.dtype, device=p.device) for p in parameters]
        step_sizes = [torch.tensor(lr, dtype=p.dtype, device=p.device) for p in parameters]

    log_probs, correct, state = [], [], None
    try:
        with gradients_in_eval_mode():
            for x, y in stream_loader(ids, num_steps):
                x, y = x.to(device), y[0].to(device)
                logits, state = net(x, state)
                state = map_state(torch.Tensor.detach, state)
                scored = F.log_softmax(logits[0].detach().double(), dim=-1)
                log_probs.append(scored.gather(1, y[:, None])[:, 0])
                correct.append(scored.argmax(-1) == y)
                # Only now, the segment scored, do the weights learn from it.
                grads = torch.autograd.grad(F.cross_entropy(logits[0], y), parameters)
                with torch.no_grad():  # in place, no temporaries: a pass over every weight per segment
                    for p, p0, grad, rate, step in zip(
                        parameters, trained, grads, decay_rates, step_sizes, strict=True
                    ):
                        p.lerp_(p0, rate).addcmul_(grad, step, value=-1)
    finally:
        with torch.no_grad():
            for p, p0 in zip(parameters, trained, strict=True):
                p.copy_(p0)
    return torch.cat(log_probs), torch.cat(correct)
