"""The softmax heads: features in, log-probabilities out (docs/training.md, "Adaptive softmax").

The full softmax is one linear layer over the vocabulary. The adaptive softmax of Grave et al. (2017)
puts the frequent words and one entry per tail cluster in a head, the rarer words in clusters behind
smaller projections, and scores a target without the whole distribution. Both are torch's modules
with the three readings every caller uses; their parameters keep torch's names, so checkpoints do
not depend on this file.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import pairwise
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lm.models.network import State
from lm.options import above, option, refusal


@dataclass(frozen=True)
class HeadOptions:
    """The softmax head's options, which every network's options carry (model.net.*)."""

    softmax: Literal["full", "adaptive"] = option("full")
    """full: one linear layer over the vocabulary; adaptive: Grave et al.'s head and tail clusters."""
    cutoffs: list[int] | None = option(None)
    """adaptive: the first id of each tail cluster, ids running frequent to rare (PTB: [6000])."""
    div_value: float = option(4.0, above(0))
    """adaptive: each cluster's projection 1/div_value the size of the one before (torch's default)."""

    def head(self, size: int, vocab_size: int) -> "FullSoftmax | AdaptiveSoftmax":
        """The head over features of `size` units."""
        if self.softmax == "full":
            return FullSoftmax(size, vocab_size)
        return AdaptiveSoftmax(size, vocab_size, list(self.cutoffs), self.div_value, head_bias=True)

    def head_problems(
        self, prefix: str, size_key: str, size: int, tied: bool, vocab_size: int | None
    ) -> list[str]:
        """The adaptive softmax's cutoffs (against the vocabulary once its size is known), its
        projections' sizes (from `size`, the features' units, set by `size_key`), and tying, which
        it cannot do."""
        if self.softmax != "adaptive":
            if self.cutoffs is None:
                return []
            allowed = f"null with {prefix}.softmax=full; set {prefix}.softmax=adaptive to use them"
            return [refusal(f"{prefix}.cutoffs", self.cutoffs, allowed)]
        if not _increasing(self.cutoffs, vocab_size):
            limit = "" if vocab_size is None else f" and below the vocabulary size ({vocab_size})"
            allowed = f"a strictly increasing list of integers, each 1 or more{limit}, such as [2000,5000]"
            return [refusal(f"{prefix}.cutoffs", self.cutoffs, allowed)]
        lines = []
        if size // self.div_value ** len(self.cutoffs) < 1:
            lines.append(
                f"{prefix}.div_value={self.div_value} leaves the last of {len(self.cutoffs)} tail clusters "
                f"no projection ({prefix}.{size_key} {size} // {self.div_value} ** "
                f"{len(self.cutoffs)} = 0 units): lower {prefix}.div_value or give fewer {prefix}.cutoffs."
            )
        if tied:
            lines.append(
                f"{prefix}.tie_weights=true is not allowed with {prefix}.softmax=adaptive: its projections "
                f"cannot share the embedding matrix; set {prefix}.tie_weights=false or {prefix}.softmax=full."
            )
        return lines


def _increasing(cutoffs: list[int] | None, vocab_size: int | None) -> bool:
    """1 <= c_1 < c_2 < ... < vocab_size."""
    if not cutoffs:
        return False
    increasing = cutoffs[0] >= 1 and all(a < b for a, b in pairwise(cutoffs))
    return increasing and (vocab_size is None or cutoffs[-1] < vocab_size)


class HeadedNetwork(nn.Module):
    """The part of lm/models/network.py's contract that every network's head answers: logits and
    log-probabilities from the features, through its `decoder` (the full softmax) or its
    `adaptive_softmax`, the names its weights have in checkpoints. A network sets its head with
    `set_head`, and defines `features` and `drop_output`."""

    decoder: "FullSoftmax | None"
    adaptive_softmax: "AdaptiveSoftmax | None"

    def set_head(self, options: HeadOptions, size: int, vocab_size: int) -> None:
        head = options.head(size, vocab_size)
        self.decoder = head if options.softmax == "full" else None
        self.adaptive_softmax = None if options.softmax == "full" else head

    @property
    def softmax(self) -> "FullSoftmax | AdaptiveSoftmax":
        return self.decoder if self.decoder is not None else self.adaptive_softmax

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """Logits (batch, steps, vocab) for token ids x (batch, steps), and the new state."""
        features, state = self.features(x, state)
        return self.logits(self.drop_output(features)), state

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.softmax.logits(features)

    def target_log_probs(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.softmax.target_log_probs(features, targets)

    def evaluate_targets(
        self, features: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.softmax.evaluate_targets(features, targets)


class FullSoftmax(nn.Linear):
    """Logits of every word from the features: `nn.Linear(features, vocabulary)`."""

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self(features)

    def target_log_probs(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return _target_log_probs(self(features), targets)

    def evaluate_targets(
        self, features: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(features)  # one set of logits for both
        return _target_log_probs(logits, targets), logits.argmax(-1)


class AdaptiveSoftmax(nn.AdaptiveLogSoftmaxWithLoss):
    """torch's adaptive softmax rather than a hand-written one: its head, tail projections and
    `predict` are tested upstream. It offers no weight tying (its head and projections cannot share
    the embedding matrix: that takes Baevski & Auli's adaptive input, not built), so the options
    refuse `tie_weights` with it. Ids run from frequent to rare, as the vocabulary's do."""

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Log-probabilities, already normalised and so logits as well (log_softmax, softmax and
        argmax read them alike)."""
        with self._flat(features) as flat:
            return self.log_prob(flat).view(*features.shape[:2], -1)

    def target_log_probs(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Only the head and the targets' clusters are computed."""
        with self._flat(features) as flat:
            return self(flat, targets.flatten()).output.view_as(targets)

    def evaluate_targets(
        self, features: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The likeliest token from torch's `predict`, which computes a tail cluster only where the
        head's best entry is that cluster."""
        with self._flat(features) as flat:
            likeliest = self.predict(flat).view_as(targets)
        return self.target_log_probs(features, targets), likeliest

    @contextmanager
    def _flat(self, features: torch.Tensor) -> Iterator[torch.Tensor]:
        """Features as torch's module takes them: flat, in its weights' dtype, outside autocast.
        Under autocast it mixes its input's dtype with log_softmax's and fails (index_copy_), and
        bfloat16 log-probabilities would lose the perplexity's digits."""
        with torch.autocast(features.device.type, enabled=False):
            yield features.flatten(0, 1).to(self.head.weight.dtype)


def _target_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) (batch, steps) under logits (batch, steps, vocab): minus PyTorch's cross-entropy."""
    return -F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
