"""Continuous neural cache (Grave et al. 2017): the model's prediction mixed with a memory of the
text just read.

For target t, read after the last layer's output h_t,

    p(w) = (1 - lambda) p_model(w | h_t) + lambda p_cache(w),
    p_cache(w) proportional to the sum, over the last `window` positions i < t whose target y_i
    was w, of exp(theta * h_t . h_i).

Position i enters the cache only once its target y_i has been scored (i < t), so no target is
looked at before it is scored. The very first target has an empty cache and gets p_model alone.
"""

import torch
import torch.nn.functional as F
from torch import nn

from lm.errors import UserError, check_rules
from lm.scoring import stream_loader


def check_options(window, theta, **options) -> None:
    """One clear error, naming the `cache.` key, before any work."""
    interpolation = options["lambda"]  # the paper's name, a Python keyword
    if window is None:
        return
    for key, value in (("lambda", interpolation), ("theta", theta)):
        if value is None:
            raise UserError(
                f"cache.{key} has no value; cache.window={window} needs one, e.g. cache.{key}=... as "
                "recommended in conf/evaluate.yaml."
            )

    rules = [
        ("window", window, isinstance(window, int) and window >= 1, "null (off) or an integer, 1 or more"),
        (
            "lambda",
            interpolation,
            isinstance(interpolation, int | float) and 0 <= interpolation <= 1,
            "a number in [0, 1]",
        ),
        ("theta", theta, isinstance(theta, int | float) and theta >= 0, "a number, 0 or more"),
    ]
    check_rules("cache", rules)


@torch.no_grad()
def cache_log_probs(
    net: nn.Module,
    ids: torch.Tensor,
    window: int,
    interpolation: float,
    theta: float,
    num_steps: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability (float64) of each target of `ids` read as one stream under the cache model,
    and whether it was the likeliest token; `interpolation` is the paper's lambda. `num_steps`
    only sets how many targets are computed at once."""
    log_weights = torch.tensor([1 - interpolation, interpolation], dtype=torch.float64, device=device).log()
    past_features = torch.empty(0, net.output_size, device=device, dtype=torch.float64)
    past_targets = torch.empty(0, device=device, dtype=torch.long)
    log_probs, correct, state = [], [], None
    for x, y in stream_loader(ids, num_steps):
        x, y = x.to(device), y[0].to(device)
        features, state = net.hidden(x, state)
        model_log_probs = F.log_softmax(net.logits(features)[0].double(), dim=-1)
        queries = features[0].double()
        keys, values = torch.cat([past_features, queries]), torch.cat([past_targets, y])
        # Target j of this window (position past + j) sees the positions in [past + j - window, past + j).
        past = len(past_targets)
        position = torch.arange(len(keys), device=device)
        now = past + torch.arange(len(y), device=device)[:, None]
        visible = (position < now) & (position >= now - window)
        scores = (theta * queries @ keys.T).masked_fill(~visible, float("-inf"))
        attention = torch.softmax(scores, dim=-1)  # NaN where nothing is visible: replaced below
        cache_probs = torch.zeros_like(model_log_probs).scatter_add_(1, values.expand(len(y), -1), attention)
        mixed = torch.logaddexp(model_log_probs + log_weights[0], cache_probs.log() + log_weights[1])
        mixed = torch.where(visible.any(dim=1, keepdim=True), mixed, model_log_probs)
        log_probs.append(mixed.gather(1, y[:, None])[:, 0])
        correct.append(mixed.argmax(-1) == y)
        past_features, past_targets = keys[-window:], values[-window:]
    return torch.cat(log_probs), torch.cat(correct)
