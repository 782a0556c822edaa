"""The xLSTM network (Beck et al., NeurIPS 2024): word embeddings -> a stack of mLSTM and sLSTM
blocks -> the project's softmax heads (docs/training.md, "xLSTM").

The blocks are the paper's: an mLSTM block puts the cell between an up- and a down-projection, an
sLSTM block puts a gated feed-forward layer after it; the cells are in lm/models/xlstm_cells.py, and
every form of the mLSTM gives the same numbers, and training computes it chunk by chunk. Each block
carries its own state between windows, its causal convolution's last inputs included.

The cells run in float32 even under a bfloat16 autocast: their forget gates sit within a few
thousandths of 1 (log f of -0.05 to -0.003 with the initial biases), which bfloat16's 8-bit mantissa
rounds to exactly 1 next to a stabiliser of 1 or more, and their memories are running sums that it
would stop adding to. Their projections keep the autocast's speed.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lm.models.dropout import embedding_dropout
from lm.models.network import NetworkOptions, State
from lm.models.softmax import HeadedNetwork, HeadOptions
from lm.models.xlstm_cells import mlstm_chunkwise, slstm_steps
from lm.options import FRACTION, above, at_least, option, refusal


@dataclass(frozen=True)
class XLSTMOptions(HeadOptions, NetworkOptions):
    """model.net.* of `model/net=xlstm`."""

    name = "xlstm"
    embedding_size: int = option(128, at_least(1))
    """The blocks' width (the residual stream), the embedding's and the tied softmax's size."""
    num_blocks: int = option(2, at_least(1))
    """Blocks in the stack."""
    slstm_at: list[int] = option([1])
    """Which blocks (0-based) are sLSTM; the others are mLSTM. The paper's xLSTM[1:1] with 4 blocks
    is [1,3]; xLSTM[1:0] is []."""
    num_heads: int = option(4, at_least(1))
    """Heads of each cell: its memory is split in this many independent parts."""
    proj_factor: float = option(2.0, at_least(1))
    """mLSTM blocks: the cell's width, as a multiple of embedding_size (the paper's up-projection)."""
    ffn_factor: float = option(4 / 3, above(0))
    """sLSTM blocks: the gated feed-forward layer's width, as a multiple of embedding_size."""
    qkv_block_size: int = option(4, at_least(1))
    """mLSTM: the query, key and value projections are block-diagonal with blocks of this size (the
    paper's 4: each mixes only a few neighbouring units, and costs next to nothing)."""
    conv_kernel: int = option(4, at_least(1))
    """The causal convolution's width, in tokens (1: a per-token scaling)."""
    chunk_size: int | None = option(None, at_least(1))
    """mLSTM: tokens computed at once, the state carried between chunks; null: the whole window (the
    parallel form). Changes the cost (quadratic in it), not the result."""
    dropout: float = option(0.0, FRACTION)
    """On the embedding output and on each block's output before it joins the residual stream."""
    output_dropout: float = option(0.0, FRACTION)
    """On the features the softmax reads."""
    embedding_dropout: float = option(0.0, FRACTION)
    """Drops whole words: a dropped word's embedding is zero wherever it occurs in the batch."""
    init_scale: float = option(0.1, above(0))
    """The embedding (and the tied softmax) starts uniform in +-init_scale."""
    tie_weights: bool = option(True)
    """The decoder shares the embedding matrix (Press & Wolf 2017, Inan et al. 2017)."""

    def network(self, vocab_size: int) -> "XLSTMNetwork":
        return XLSTMNetwork(vocab_size, self)

    def problems(self, prefix: str, vocab_size: int | None = None) -> list[str]:
        lines = []
        outside = [i for i in self.slstm_at if not 0 <= i < self.num_blocks]
        if outside or len(set(self.slstm_at)) < len(self.slstm_at):
            allowed = f"distinct block numbers from 0 to {self.num_blocks - 1} ({prefix}.num_blocks - 1)"
            lines.append(refusal(f"{prefix}.slstm_at", self.slstm_at, allowed))
        # The widths each kind of block splits: an sLSTM block's into heads, an mLSTM block's inner
        # width into heads and into the projections' blocks.
        inner = (
            [("embedding_size * proj_factor", self.inner_size)]
            if len(self.slstm_at) < self.num_blocks
            else []
        )
        outer = [("embedding_size", self.embedding_size)] if self.slstm_at else []
        for divisor, parts, widths in [
            ("num_heads", "each head takes", outer + inner),
            ("qkv_block_size", "each block of the projections takes", inner),
        ]:
            for key, width in widths:
                if width % getattr(self, divisor):
                    lines.append(
                        f"{prefix}.{divisor}={getattr(self, divisor)} does not divide {prefix}.{key} "
                        f"({width}): {parts} an equal part of it; choose a divisor."
                    )
        if self.slstm_at and round(self.ffn_factor * self.embedding_size) < 1:
            allowed = (
                f"a factor of {prefix}.embedding_size that leaves the sLSTM blocks' feed-forward layer a unit"
            )
            lines.append(refusal(f"{prefix}.ffn_factor", self.ffn_factor, allowed))
        return lines + self.head_problems(
            prefix, "embedding_size", self.embedding_size, self.tie_weights, vocab_size
        )

    @property
    def inner_size(self) -> int:
        """The mLSTM cell's width."""
        return round(self.proj_factor * self.embedding_size)


class XLSTMNetwork(HeadedNetwork):
    """Word-level xLSTM network, keeping lm/models/network.py's contract; its options are XLSTMOptions'.
    Blocks are pre-norm residual, and a last LayerNorm precedes the softmax."""

    def __init__(self, vocab_size: int, options: XLSTMOptions):
        super().__init__()
        o = self.options = options
        self.embedding = nn.Embedding(vocab_size, o.embedding_size)
        self.blocks = nn.ModuleList(
            SLSTMBlock(o) if i in o.slstm_at else MLSTMBlock(o) for i in range(o.num_blocks)
        )
        self.norm = nn.LayerNorm(o.embedding_size)
        self.dropout = nn.Dropout(o.dropout)
        self.output_dropout = nn.Dropout(o.output_dropout)
        self.output_size = o.embedding_size
        self.set_head(o, o.embedding_size, vocab_size)
        nn.init.uniform_(self.embedding.weight, -o.init_scale, o.init_scale)
        for name, parameter in self.softmax.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(parameter)
            else:
                nn.init.uniform_(parameter, -o.init_scale, o.init_scale)
        if o.tie_weights:
            self.decoder.weight = self.embedding.weight

    def features(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        out = self.dropout(
            embedding_dropout(self.embedding, x, self.options.embedding_dropout, self.training)
        )
        new_state = []
        for i, block in enumerate(self.blocks):
            out, block_state = block(out, None if state is None else state[i], self.dropout)
            new_state.append(block_state)
        return self.norm(out), new_state

    def drop_output(self, features: torch.Tensor) -> torch.Tensor:
        return self.output_dropout(features)


def full_precision(t: torch.Tensor) -> torch.Tensor:
    """t in float32 at least (an autocast's bfloat16 or float16 raised; float64 kept)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


# --- the blocks ------------------------------------------------------------------------------------
# A block's state is a tuple of tensors (1, batch, ...): the batch in dimension 1, as the contract asks.


class CausalConv(nn.Module):
    """A depthwise convolution over time that sees only the past: its state is the last
    `kernel - 1` inputs of the window before (zeros at the start)."""

    def __init__(self, size: int, kernel: int):
        super().__init__()
        self.conv = nn.Conv1d(size, size, kernel, groups=size)
        self.kernel = kernel

    def forward(self, x: torch.Tensor, past: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if past is None:
            past = x.new_zeros(x.size(0), self.kernel - 1, x.size(2))
        padded = torch.cat([past, x], dim=1)
        out = self.conv(padded.transpose(1, 2)).transpose(1, 2)
        return out, padded[:, padded.size(1) - (self.kernel - 1) :]


class BlockDiagonal(nn.Module):
    """A linear layer whose weight is block-diagonal: each block of `block_size` units is mixed
    only within itself."""

    def __init__(self, size: int, block_size: int):
        super().__init__()
        blocks = size // block_size
        bound = 1 / math.sqrt(block_size)  # nn.Linear's default, for a block's fan-in
        self.weight = nn.Parameter(torch.empty(blocks, block_size, block_size).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = x.unflatten(-1, (self.weight.size(0), -1))
        return torch.einsum("...bi,bio->...bo", blocks, self.weight).flatten(-2) + self.bias


class HeadNorm(nn.Module):
    """Layer normalisation of each head's part separately (the paper's group norm), with one scale."""

    def __init__(self, size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads = x.unflatten(-1, (self.num_heads, -1))
        return F.layer_norm(heads, heads.shape[-1:]).flatten(-2) * self.weight


class MLSTMBlock(nn.Module):
    """The paper's pre-up-projection block: x + dropout(down(mLSTM(conv(up(norm x))) * swish(gate)))."""

    def __init__(self, o: XLSTMOptions):
        super().__init__()
        size, inner, self.num_heads = o.embedding_size, o.inner_size, o.num_heads
        self.chunk_size = o.chunk_size
        self.norm = nn.LayerNorm(size)
        self.up = nn.Linear(size, 2 * inner)  # the cell's input and the output gate's
        self.conv = CausalConv(inner, o.conv_kernel)
        self.query, self.key, self.value = (BlockDiagonal(inner, o.qkv_block_size) for _ in range(3))
        self.gates = nn.Linear(3 * inner, 2 * o.num_heads)  # input and forget gate of each head
        self.head_norm = HeadNorm(inner, o.num_heads)
        self.skip = nn.Parameter(torch.ones(inner))  # the convolution's output, added to the cell's
        self.down = nn.Linear(inner, size)
        # The gates start as the paper's: the forget gates open (bias 3 to 6 across the heads), the
        # input gates near exp(0), both from their bias alone.
        nn.init.zeros_(self.gates.weight)
        with torch.no_grad():
            self.gates.bias[: o.num_heads].normal_(0, 0.1)
            self.gates.bias[o.num_heads :] = torch.linspace(3.0, 6.0, o.num_heads)

    def forward(
        self, x: torch.Tensor, state: tuple[torch.Tensor, ...] | None, dropout: nn.Module
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        past, memory = (None, None) if state is None else (state[0][0], tuple(s[0] for s in state[1:]))
        cell_input, gate = self.up(self.norm(x)).chunk(2, dim=-1)
        convolved, past = self.conv(cell_input, past)
        convolved = F.silu(convolved)
        q, k, v = self.query(convolved), self.key(convolved), self.value(cell_input)
        input_gate, forget_gate = self.gates(torch.cat([q, k, v], dim=-1)).chunk(2, dim=-1)

        def heads(t: torch.Tensor) -> torch.Tensor:
            """(batch, steps, inner) -> (batch, heads, steps, inner / heads)."""
            return full_precision(t).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

        with torch.autocast(x.device.type, enabled=False):  # the cell in float32 (the module's docstring)
            h, memory = mlstm_chunkwise(
                heads(q),
                heads(k) / math.sqrt(k.size(-1) // self.num_heads),
                heads(v),
                full_precision(input_gate).transpose(1, 2),
                F.logsigmoid(full_precision(forget_gate)).transpose(1, 2),
                memory,
                self.chunk_size,
            )
        h = self.head_norm(h.transpose(1, 2).flatten(2)) + self.skip * convolved
        out = x + dropout(self.down(h * F.silu(gate)))
        return out, tuple(s[None] for s in (past, *memory))


class SLSTMBlock(nn.Module):
    """The paper's post-up-projection block: x + dropout(sLSTM(norm x)), then a gated feed-forward
    layer, x + dropout(down(gelu(a) * b)) with a, b = up(norm x)."""

    def __init__(self, o: XLSTMOptions):
        super().__init__()
        size, self.num_heads = o.embedding_size, o.num_heads
        head_size = size // o.num_heads
        self.norm = nn.LayerNorm(size)
        self.conv = CausalConv(size, o.conv_kernel)
        self.gate_inputs = nn.Linear(size, 2 * size)  # input and forget gates, from the convolution
        self.cell_inputs = nn.Linear(size, 2 * size)  # the cell's input and the output gate
        # Head-wise recurrence: each head's units see only that head's previous outputs.
        self.recurrent = nn.Parameter(torch.empty(o.num_heads, head_size, 4 * head_size))
        nn.init.uniform_(self.recurrent, -1 / math.sqrt(head_size), 1 / math.sqrt(head_size))
        with torch.no_grad():  # the forget gates start open, as the mLSTM's
            self.gate_inputs.bias[size:] = torch.linspace(3.0, 6.0, size)
        self.head_norm = HeadNorm(size, o.num_heads)
        ffn = round(o.ffn_factor * size)
        self.ffn_norm = nn.LayerNorm(size)
        self.ffn_up = nn.Linear(size, 2 * ffn)
        self.ffn_down = nn.Linear(ffn, size)

    def forward(
        self, x: torch.Tensor, state: tuple[torch.Tensor, ...] | None, dropout: nn.Module
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        past, memory = (None, None) if state is None else (state[0][0], tuple(s[0] for s in state[1:]))
        normed = self.norm(x)
        convolved, past = self.conv(normed, past)
        i, f = self.gate_inputs(F.silu(convolved)).chunk(2, dim=-1)
        z, o = self.cell_inputs(normed).chunk(2, dim=-1)
        # (batch, steps, heads, unit, 4), per unit in the recurrent weights' order: i, f, z, o.
        inputs = torch.stack([i, f, z, o], dim=-1).unflatten(2, (self.num_heads, -1))
        with torch.autocast(x.device.type, enabled=False):  # the cell in float32 (the module's docstring)
            h, memory = slstm_steps(full_precision(inputs), self.recurrent, memory)
        x = x + dropout(self.head_norm(h.flatten(2)))
        a, b = self.ffn_up(self.ffn_norm(x)).chunk(2, dim=-1)
        out = x + dropout(self.ffn_down(F.gelu(a) * b))
        return out, tuple(s[None] for s in (past, *memory))
