"""The LSTM network: embedding -> LSTM layers -> softmax, with Zaremba's dropout or AWD-LSTM's
regularisers (docs/design.md, "Model and training"; docs/training.md, "AWD-LSTM options").

Zaremba et al. (2014) use dropout on the non-recurrent connections only. AWD-LSTM (Merity et al.,
2017) adds locked dropout, embedding (word) dropout and DropConnect on the recurrent weights; each
of those is off by default, and with all of them off the layers run as one multi-layer nn.LSTM
(one cuDNN call on GPU), so the Zaremba presets keep their numbers and their speed.
"""

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from lm.models.dropout import embedding_dropout, locked_dropout
from lm.models.network import State
from lm.models.softmax import AdaptiveSoftmax, FullSoftmax


class LSTMNetwork(nn.Module):
    """Word-level LSTM network, keeping lm/models/network.py's contract. Options beyond Zaremba's
    are AWD-LSTM's, all off by default.

    `dropout`: Zaremba's, a new mask per step on the embedding output, between layers and on the
    output. `input_dropout`, `hidden_dropout`, `output_dropout`: locked (variational) dropout at
    the same three places. `embedding_dropout`: drops whole words. `weight_drop`: DropConnect on
    each layer's hidden-to-hidden weights, a new mask per window. With `tie_weights` the decoder
    shares the embedding matrix; when `embedding_size` differs from `hidden_size` the last layer
    has `embedding_size` units, as in AWD-LSTM. `softmax="adaptive"`: a head over the ids below
    `cutoffs[0]` and one entry per tail cluster, the i-th cluster (from `cutoffs[i - 1]`) behind a
    projection of (last layer size) // div_value ** i units.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        num_layers: int,
        dropout: float,
        init_scale: float,
        tie_weights: bool = False,
        embedding_size: int | None = None,
        input_dropout: float = 0.0,
        hidden_dropout: float = 0.0,
        output_dropout: float = 0.0,
        embedding_dropout: float = 0.0,
        weight_drop: float = 0.0,
        init: str = "uniform",
        softmax: str = "full",
        cutoffs: list[int] | None = None,
        div_value: float = 4.0,
    ):
        super().__init__()
        embedding_size = embedding_size or hidden_size
        self.input_dropout, self.hidden_dropout = input_dropout, hidden_dropout
        self.output_dropout, self.embedding_dropout, self.weight_drop = (
            output_dropout,
            embedding_dropout,
            weight_drop,
        )
        self.embedding = nn.Embedding(vocab_size, embedding_size)
        self.step_dropout = nn.Dropout(dropout)  # Zaremba's: a new mask at every step
        last_size = embedding_size if tie_weights else hidden_size
        sizes = [embedding_size] + [hidden_size] * (num_layers - 1) + [last_size]
        if hidden_dropout or weight_drop or len(set(sizes)) > 1:  # needs a hand between the layers
            self.rnns = nn.ModuleList(
                nn.LSTM(sizes[i], sizes[i + 1], batch_first=True) for i in range(num_layers)
            )
        else:  # nn.LSTM's `dropout` acts between layers only
            self.rnns = nn.ModuleList(
                [nn.LSTM(hidden_size, hidden_size, num_layers, dropout=dropout, batch_first=True)]
            )
        self.output_size = last_size  # what the softmax, and the cache, read at each position
        # The head, under the names its weights have in checkpoints: `decoder` or `adaptive_softmax`.
        self.decoder, self.adaptive_softmax = None, None
        if softmax == "full":
            self.decoder = FullSoftmax(last_size, vocab_size)
        else:
            self.adaptive_softmax = AdaptiveSoftmax(
                last_size, vocab_size, list(cutoffs), div_value, head_bias=True
            )
        if init == "uniform":  # Zaremba: every weight uniform in [-init_scale, init_scale]
            for parameter in self.parameters():
                nn.init.uniform_(parameter, -init_scale, init_scale)
        elif init == "awd":  # AWD-LSTM: embedding and softmax weights uniform, bias 0, LSTM PyTorch's default
            nn.init.uniform_(self.embedding.weight, -init_scale, init_scale)
            for name, parameter in self.softmax.named_parameters():
                if name.endswith("bias"):
                    nn.init.zeros_(parameter)
                else:
                    nn.init.uniform_(parameter, -init_scale, init_scale)
        if tie_weights:  # Press & Wolf (2017), Inan et al. (2017)
            self.decoder.weight = self.embedding.weight

    @property
    def softmax(self) -> FullSoftmax | AdaptiveSoftmax:
        return self.decoder if self.decoder is not None else self.adaptive_softmax

    def features(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """The last layer's outputs (batch, steps, size), before output dropout, and the new state."""
        out = embedding_dropout(self.embedding, x, self.embedding_dropout, self.training)
        out = self.step_dropout(locked_dropout(out, self.input_dropout, self.training))
        new_state = []
        for i, rnn in enumerate(self.rnns):
            if i > 0:
                out = self.step_dropout(locked_dropout(out, self.hidden_dropout, self.training))
            out, layer_state = self._run(rnn, out, None if state is None else state[i])
            new_state.append(layer_state)
        return out, new_state

    def drop_output(self, features: torch.Tensor) -> torch.Tensor:
        return self.step_dropout(locked_dropout(features, self.output_dropout, self.training))

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """Logits (batch, steps, vocab) for token ids x (batch, steps); a None state means zeros."""
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

    def _run(self, rnn: nn.LSTM, x: torch.Tensor, state: tuple[torch.Tensor, ...] | None):
        if not (self.training and self.weight_drop):
            return rnn(x, state)
        # DropConnect (Wan et al. 2013) on the recurrent weights: the masked matrix goes to the
        # LSTM op directly, so the parameters, and nn.LSTM's flat cuDNN buffer, stay untouched and
        # the gradient reaches them through the mask. (Assigning the masked tensor to the module,
        # as the AWD-LSTM code did, breaks on current PyTorch.)
        weights = [
            rnn.weight_ih_l0,
            F.dropout(rnn.weight_hh_l0, self.weight_drop),
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
