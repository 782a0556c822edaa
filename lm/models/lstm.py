"""The LSTM network: embedding -> LSTM layers -> softmax, with Zaremba's dropout or AWD-LSTM's
regularisers (docs/design.md, "Model and training"; docs/training.md, "AWD-LSTM options").

Zaremba et al. (2014) use dropout on the non-recurrent connections only. AWD-LSTM (Merity et al.,
2017) adds locked dropout, embedding (word) dropout and DropConnect on the recurrent weights; each
of those is off by default, and with all of them off the layers run as one multi-layer nn.LSTM
(one cuDNN call on GPU), so the Zaremba presets keep their numbers and their speed.
"""

import warnings
from dataclasses import dataclass
from itertools import pairwise
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lm.models.dropout import embedding_dropout, locked_dropout
from lm.models.network import NetworkOptions, State
from lm.models.softmax import HeadedNetwork, HeadOptions
from lm.options import FRACTION, above, at_least, option


@dataclass(frozen=True)
class LSTMOptions(HeadOptions, NetworkOptions):
    """model.net.* of `model/net=lstm` (the default): Zaremba's LSTM, and AWD-LSTM's regularisers,
    each of those off by default."""

    name = "lstm"
    hidden_size: int = option(200, at_least(1))
    """Units of each layer; with tie_weights the last one has embedding_size (one layer: it alone)."""
    num_layers: int = option(2, at_least(1))
    """LSTM layers."""
    dropout: float = option(0.0, FRACTION)
    """Zaremba's: a new mask per step on the embedding output, between the layers and on the output."""
    init_scale: float = option(0.1, above(0))
    """Weights start uniform in +-init_scale (init=awd: the embedding's and the softmax's only)."""
    tie_weights: bool = option(False)
    """The decoder shares the embedding matrix (Press & Wolf 2017, Inan et al. 2017)."""
    embedding_size: int | None = option(None, at_least(1))
    """Null: hidden_size. With tie_weights the last layer gets this size (AWD-LSTM: 400 / 1150 / 400)."""
    input_dropout: float = option(0.0, FRACTION)
    """Locked dropout (one mask per sequence, the same at every step) on the embedding output."""
    hidden_dropout: float = option(0.0, FRACTION)
    """Locked dropout between the LSTM layers."""
    output_dropout: float = option(0.0, FRACTION)
    """Locked dropout on the last layer's output."""
    embedding_dropout: float = option(0.0, FRACTION)
    """Drops whole words: a dropped word's embedding is zero wherever it occurs in the batch."""
    weight_drop: float = option(0.0, FRACTION)
    """DropConnect on each layer's hidden-to-hidden weights, a new mask per window."""
    init: Literal["uniform", "awd"] = option("uniform")
    """uniform: every weight in +-init_scale (Zaremba); awd: the embedding and softmax, the LSTM PyTorch's."""

    def network(self, vocab_size: int) -> "LSTMNetwork":
        return LSTMNetwork(vocab_size, self)

    def layer_sizes(self) -> list[int]:
        """The embedding's size, then each layer's units: the last has embedding_size when tied."""
        embedding_size = self.embedding_size or self.hidden_size
        last_size = embedding_size if self.tie_weights else self.hidden_size
        return [embedding_size] + [self.hidden_size] * (self.num_layers - 1) + [last_size]

    def problems(self, prefix: str, vocab_size: int | None = None) -> list[str]:
        return self.head_problems(prefix, "hidden_size", self.hidden_size, self.tie_weights, vocab_size)


class LSTMNetwork(HeadedNetwork):
    """Word-level LSTM network, keeping lm/models/network.py's contract; its options are
    `LSTMOptions`' (the embedding size, when tied, is the last layer's size: AWD-LSTM's 400 / 1150 /
    1150 / 400). The adaptive softmax's i-th tail cluster (ids from `cutoffs[i - 1]`) sits behind a
    projection of (last layer size) // div_value ** i units."""

    def __init__(self, vocab_size: int, options: LSTMOptions):
        super().__init__()
        o = self.options = options
        sizes = o.layer_sizes()
        embedding_size, last_size = sizes[0], sizes[-1]
        self.embedding = nn.Embedding(vocab_size, embedding_size)
        self.step_dropout = nn.Dropout(o.dropout)  # Zaremba's: a new mask at every step
        self.rnns = self._layers(sizes)
        self.output_size = last_size  # what the softmax, and the cache, read at each position
        # The head, under the names its weights have in checkpoints: `decoder` or `adaptive_softmax`.
        self.set_head(o, last_size, vocab_size)
        if o.init == "uniform":  # Zaremba: every weight uniform in [-init_scale, init_scale]
            for parameter in self.parameters():
                nn.init.uniform_(parameter, -o.init_scale, o.init_scale)
        elif o.init == "awd":
            # AWD-LSTM: embedding and softmax weights uniform, bias 0, LSTM PyTorch's default
            nn.init.uniform_(self.embedding.weight, -o.init_scale, o.init_scale)
            for name, parameter in self.softmax.named_parameters():
                if name.endswith("bias"):
                    nn.init.zeros_(parameter)
                else:
                    nn.init.uniform_(parameter, -o.init_scale, o.init_scale)
        if o.tie_weights:  # Press & Wolf (2017), Inan et al. (2017)
            self.decoder.weight = self.embedding.weight

    def _layers(self, sizes: list[int]) -> nn.ModuleList:
        """The recurrent layers, layer i from sizes[i] to sizes[i + 1] units, each run by `_run`."""
        o = self.options
        if o.hidden_dropout or o.weight_drop or len(set(sizes)) > 1:  # needs a hand between the layers
            return nn.ModuleList(nn.LSTM(size, units, batch_first=True) for size, units in pairwise(sizes))
        # Every layer of one size (one tied layer: embedding_size); `dropout` acts between layers only.
        return nn.ModuleList([nn.LSTM(sizes[0], sizes[0], o.num_layers, dropout=o.dropout, batch_first=True)])

    def features(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """The last layer's outputs (batch, steps, size), before output dropout, and the new state."""
        out = embedding_dropout(self.embedding, x, self.options.embedding_dropout, self.training)
        out = self.step_dropout(locked_dropout(out, self.options.input_dropout, self.training))
        new_state = []
        for i, rnn in enumerate(self.rnns):
            if i > 0:
                out = self.step_dropout(locked_dropout(out, self.options.hidden_dropout, self.training))
            out, layer_state = self._run(rnn, out, None if state is None else state[i])
            new_state.append(layer_state)
        return out, new_state

    def drop_output(self, features: torch.Tensor) -> torch.Tensor:
        return self.step_dropout(locked_dropout(features, self.options.output_dropout, self.training))

    def _run(self, rnn: nn.LSTM, x: torch.Tensor, state: tuple[torch.Tensor, ...] | None):
        if not (self.training and self.options.weight_drop):
            return rnn(x, state)
        # DropConnect (Wan et al. 2013) on the recurrent weights: the masked matrix goes to the
        # LSTM op directly, so the parameters, and nn.LSTM's flat cuDNN buffer, stay untouched and
        # the gradient reaches them through the mask. (Assigning the masked tensor to the module,
        # as the AWD-LSTM code did, breaks on current PyTorch.)
        weights = [
            rnn.weight_ih_l0,
            F.dropout(rnn.weight_hh_l0, self.options.weight_drop),
            rnn.bias_ih_l0,
            rnn.bias_hh_l0,
        ]
        if state is None:
            zeros = x.new_zeros(1, x.size(0), rnn.hidden_size)
            state = (zeros, zeros)
        with warnings.catch_warnings():
            # On GPU, cuDNN copies weights that are not in its flat buffer into one, every call,
            # and says so; a new masked matrix every window is exactly that case.
            warnings.filterwarnings("ignore", message="RNN module weights are not part of single contiguous")
            out, h, c = torch.lstm(
                x,
                state,
                weights,
                has_biases=True,
                num_layers=1,
                dropout=0.0,
                train=True,
                bidirectional=False,
                batch_first=True,
            )
        return out, (h, c)
