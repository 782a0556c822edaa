"""The Mogrifier LSTM (Melis, Kočiský & Blunsom, ICLR 2020): an LSTM whose input and previous output
gate each other for a few rounds before every step (docs/training.md, "Mogrifier LSTM").

Before each step, round j = 1..rounds rescales one of the two by the other:

    odd j:  x = 2 sigmoid(Q_j h) * x        (Q_j: hidden size -> input size)
    even j: h = 2 sigmoid(R_j x) * h        (R_j: input size -> hidden size)

and the LSTM step then reads the rescaled x and h with the unchanged cell c. The factor 2 keeps a
small random Q or R near the identity (2 sigmoid(0) = 1). With `rank` k, each Q and R is a product of
two thin matrices (size x k, k x size), as the paper does on PTB. Everything else (embedding,
AWD-LSTM's dropouts, tied decoder, softmax heads) is the LSTM network's: `MogrifierNetwork` only
swaps its layers, and with rounds=0 computes exactly what the LSTM network does.
"""

from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from lm.models.lstm import LSTMNetwork, LSTMOptions
from lm.options import at_least, option, refusal


@dataclass(frozen=True)
class MogrifierOptions(LSTMOptions):
    """model.net.* of `model/net=mogrifier`: the LSTM's options and the mogrifier's two."""

    name = "mogrifier"
    rounds: int = option(5, at_least(0))
    """Gating rounds before each step, x by h first (the paper's PTB models: 5); 0: a plain LSTM."""
    rank: int | None = option(None, at_least(0))
    """Null or 0: full-rank Q and R; k: each a product of (size x k) and (k x size) matrices (PTB: 84)."""

    def network(self, vocab_size: int) -> "MogrifierNetwork":
        return MogrifierNetwork(vocab_size, self)

    def problems(self, prefix: str, vocab_size: int | None = None) -> list[str]:
        """The LSTM's, and a rank that no Q or R can have: above the smaller of the sizes it maps."""
        lines = super().problems(prefix, vocab_size)
        smallest = min(self.layer_sizes())
        if self.rounds and self.rank and self.rank > smallest:
            allowed = (
                f"null or 0 (full rank), or at most {smallest}: a map from or to {smallest} units "
                "has no higher rank"
            )
            lines.append(refusal(f"{prefix}.rank", self.rank, allowed))
        return lines


class MogrifierLayer(nn.Module):
    """One Mogrifier LSTM layer: `rounds` gatings of x and h, then an LSTM step with nn.LSTMCell's
    weights (`cell`: their names, layout and init). Its state is (h, c), each (1, batch,
    hidden_size), as a one-layer nn.LSTM's."""

    def __init__(self, input_size: int, hidden_size: int, rounds: int, rank: int | None = None):
        super().__init__()
        self.cell = nn.LSTMCell(input_size, hidden_size)
        self.hidden_size = hidden_size
        # Round j's map, j = 1..rounds: Q_j (h to x's size) for odd j, R_j (x to h's size) for even j.
        # Each is one bias-free linear map, or two through `rank` units; PyTorch's default init.
        sizes = [(hidden_size, input_size), (input_size, hidden_size)] * rounds
        self.rounds = nn.ModuleList(
            nn.Sequential(nn.Linear(size, units, bias=False))
            if not rank
            else nn.Sequential(nn.Linear(size, rank, bias=False), nn.Linear(rank, units, bias=False))
            for size, units in sizes[:rounds]
        )

    def forward(
        self,
        x: torch.Tensor,
        state: tuple[torch.Tensor, torch.Tensor] | None = None,
        weight_hh: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Outputs (batch, steps, hidden_size) for x (batch, steps, input_size), and the new state;
        `weight_hh` replaces the cell's hidden-to-hidden matrix (DropConnect's masked copy)."""
        if state is None:
            h = c = x.new_zeros(x.size(0), self.hidden_size)
        else:
            h, c = state[0][0], state[1][0]
        cell, window = self.cell, x.shape[:2]
        maps = [[_WindowWeight(linear.weight, None, *window) for linear in round_] for round_ in self.rounds]
        ih = _WindowWeight(cell.weight_ih, cell.bias_ih, *window)
        hh = _WindowWeight(cell.weight_hh if weight_hh is None else weight_hh, cell.bias_hh, *window)
        outputs = []
        for t, x_t in enumerate(x.unbind(1)):
            h_t = h
            for j, factors in enumerate(maps):
                if j % 2 == 0:
                    x_t = x_t * 2 * torch.sigmoid(_product(factors, h_t, t))
                else:
                    h_t = h_t * 2 * torch.sigmoid(_product(factors, x_t, t))
            gates = ih.linear(x_t, t) + hh.linear(h_t, t)  # the LSTM step, nn.LSTMCell's arithmetic
            i, f, g, o = gates.chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs.append(h)
        # Time-major in memory, as nn.LSTM's batch-first output: the next layer reads each step
        # contiguous, and a dropout mask is drawn in the same order as on the LSTM's output.
        return torch.stack(outputs).transpose(0, 1), (h.unsqueeze(0), c.unsqueeze(0))


def _product(factors: list["_WindowWeight"], z: torch.Tensor, t: int) -> torch.Tensor:
    """M z at step t, M the product of `factors`, the one nearest z first."""
    for factor in factors:
        z = factor.linear(z, t)
    return z


class _WindowWeight:
    """A weight that multiplies an input at every step of a window, with its gradient taken once for
    the window rather than once per step: the same outputs, the same gradient summed in another
    order, and a window in 18% less time on 2 CPU threads, 25% on one (5 full-rank rounds, 512 units).

    Autograd would compute, at every step, the weight's share of the gradient as an outer product of
    the step's output gradient (batch x out) and input (batch x in), as large as the weight but only
    batch deep, and add it to the sum: memory-bound, those took almost half of a layer's time in
    torch.profiler. Here the steps multiply by the weight detached, and add through the bias a zero
    `tap` (steps, batch, out); the tap's backward, which autograd runs after every step's, multiplies
    all the steps' output gradients by all their inputs at once. Without gradients it is the plain
    weight.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, batch: int, steps: int):
        self.weight, self.biases, self.inputs = weight, [bias] * steps, None
        if torch.is_grad_enabled() and weight.requires_grad:
            self.weight, self.inputs = weight.detach(), []
            tap = _WindowGradient.apply(weight, self.inputs, steps, batch)
            self.biases = (tap if bias is None else bias + tap).unbind(0)  # bias + 0: the same numbers

    def linear(self, u: torch.Tensor, t: int) -> torch.Tensor:
        """u weight^T + bias at step t."""
        if self.inputs is not None:
            self.inputs.append(u.detach())
        return F.linear(u, self.weight, self.biases[t])


class _WindowGradient(torch.autograd.Function):
    """_WindowWeight's tap: zeros forward; backward, the weight's gradient from every step's inputs,
    which the loop appends to `inputs` after this forward and before this backward."""

    @staticmethod
    def forward(
        ctx, weight: torch.Tensor, inputs: list[torch.Tensor], steps: int, batch: int
    ) -> torch.Tensor:
        ctx.inputs = inputs
        return weight.new_zeros(steps, batch, weight.size(0))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        inputs = torch.stack(ctx.inputs).flatten(0, 1).to(grad.dtype)  # autocast's are of a lower one
        return grad.flatten(0, 1).T @ inputs, None, None, None


class MogrifierNetwork(LSTMNetwork):
    """The LSTM network (lm/models/lstm.py) with Mogrifier layers, one module per layer."""

    options: MogrifierOptions

    def _layers(self, sizes: list[int]) -> nn.ModuleList:
        o = self.options
        return nn.ModuleList(MogrifierLayer(size, units, o.rounds, o.rank) for size, units in pairwise(sizes))

    def _run(self, layer: MogrifierLayer, x: torch.Tensor, state: tuple[torch.Tensor, ...] | None):
        weight_hh = layer.cell.weight_hh
        if self.training and self.options.weight_drop:  # DropConnect, as the LSTM network's
            weight_hh = F.dropout(weight_hh, self.options.weight_drop)
        return layer(x, state, weight_hh)
