"""Exact perplexity and the training loss's sum (docs/design.md, "Perplexity")."""

import torch
import torch.nn.functional as F
from torchmetrics import Metric

from lm.models.network import Network


class Perplexity(Metric):
    """exp(summed NLL / number of targets), both sums kept in float64 and summed over ranks.

    Never a mean of per-window perplexities or losses: windows differ in size.
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


def summed_nll(net: Network, features: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The training loss's sum: NLL of targets y (batch, steps) at the last layer's dropped outputs."""
    return negated_sum(net.target_log_probs(features, y))


def evaluation_scores(
    net: Network, features: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL of targets y (batch, steps), added in float64, and whether each was the likeliest
    token: the per-target values and sum of lm/evaluation/scoring.py's `score_stream`, so that evaluate.py
    gives train.py's test perplexity to the last digits."""
    log_probs, likeliest = net.evaluate_targets(features, y)
    return -log_probs.double().sum(), likeliest == y


def negated_sum(log_probs: torch.Tensor) -> torch.Tensor:
    """-sum(log_probs), added up by nll_loss's own reduction: the one of F.cross_entropy(reduction=
    "sum"), so that a full softmax's training loss is PyTorch's usual one to the last bit."""
    flat = log_probs.reshape(-1, 1)
    return F.nll_loss(flat, flat.new_zeros(len(flat), dtype=torch.long), reduction="sum")
