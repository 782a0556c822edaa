"""Continuous neural cache (Grave et al. 2017): the model's prediction mixed with a memory of the
text just read.

For target t, read after the last layer's output h_t,

    p(w) = (1 - lambda) p_model(w | h_t) + lambda p_cache(w),
    p_cache(w) proportional to the sum, over the last `window` positions i < t whose target y_i
    was w, of exp(theta * h_t . h_i).

Position i enters the cache only once its target y_i has been scored (i < t), so no target is
looked at before it is scored. The very first target has an empty cache and gets p_model alone.
With dynamic evaluation as well (lm/evaluation/dynamic_eval.py), p_model and h are the adapted network's.
"""

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from lm.options import at_least, between, option, problems


@dataclass(frozen=True)
class CacheOptions:
    """evaluate.py's cache.*, off by default. Tuned on PTB's valid split: window 500, lambda 0.1,
    theta 0.3 for model=small and 1.5 for awd_cpu (docs/evaluation.md)."""

    window: int | None = option(None, at_least(1))
    """null (off), or how many past positions the cache holds."""
    interpolation: float | None = option(None, between(0, 1), key="lambda")
    """cache.lambda, the paper's name: the cache's weight in the mixture; a window needs one."""
    theta: float | None = option(None, at_least(0))
    """Flatness: the scale of h_t . h_i in the cache's softmax; a window needs one."""


def cache_problems(values: Mapping) -> list[str]:
    """Every problem of the cache.* node, one line each."""
    lines = problems(CacheOptions, values, "cache")
    window = values.get("window")
    for key in ("lambda", "theta") if not lines and window is not None else ():
        if values.get(key) is None:
            lines.append(
                f"cache.{key} has no value; cache.window={window} needs one, e.g. cache.{key}=... as "
                "recommended in docs/evaluation.md."
            )
    return lines


class NeuralCache:
    """The memory of the stream read so far: `mix` gives a chunk's mixture distributions, then
    adds the chunk's positions, each pointing at its target (lm/evaluation/scoring.py's `score_stream` reads
    the stream). `interpolation` is the paper's lambda."""

    def __init__(self, window: int, interpolation: float, theta: float, size: int, device: torch.device):
        self.window, self.theta = window, theta
        weights = torch.tensor([1 - interpolation, interpolation], dtype=torch.float64, device=device)
        self.log_weights = weights.log()
        # The last `window` positions read: the last layer's output there, and the target after it.
        self.features = torch.empty(0, size, device=device, dtype=torch.float64)
        self.targets = torch.empty(0, device=device, dtype=torch.long)

    @torch.no_grad()
    def mix(
        self, model_log_probs: torch.Tensor, features: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """Log-probabilities (steps, vocabulary) under the cache model at a chunk's positions, from
        the model's (float64) and the last layer's outputs there (steps, size)."""
        queries = features.double()
        keys, values = torch.cat([self.features, queries]), torch.cat([self.targets, targets])
        # Target j of this chunk (position past + j) sees the positions in [past + j - window, past + j).
        past = len(self.targets)
        position = torch.arange(len(keys), device=keys.device)
        now = past + torch.arange(len(targets), device=keys.device)[:, None]
        visible = (position < now) & (position >= now - self.window)
        scores = (self.theta * queries @ keys.T).masked_fill(~visible, float("-inf"))
        attention = torch.softmax(scores, dim=-1)  # NaN where nothing is visible: replaced below
        cache_probs = torch.zeros_like(model_log_probs).scatter_add_(
            1, values.expand(len(targets), -1), attention
        )
        mixed = torch.logaddexp(
            model_log_probs + self.log_weights[0], cache_probs.log() + self.log_weights[1]
        )
        self.features, self.targets = keys[-self.window :], values[-self.window :]
        return torch.where(visible.any(dim=1, keepdim=True), mixed, model_log_probs)
