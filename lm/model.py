"""The network: embedding -> LSTM layers -> softmax, with Zaremba's dropout or AWD-LSTM's regularisers.

Zaremba et al. (2014) use dropout on the non-recurrent connections only. AWD-LSTM (Merity et al.,
2017) adds locked dropout, embedding (word) dropout and DropConnect on the recurrent weights; each
of those is off by default, and with all of them off the layers run as one multi-layer nn.LSTM
(one cuDNN call on GPU), so the Zaremba presets keep their numbers and their speed.

The softmax is the full one (a linear decoder) or, as an option, the adaptive softmax of Grave et
al. (2017), which scores a target without computing the whole distribution. Every caller goes
through `target_log_probs`, `evaluate_targets` or `logits`, never the layers behind them.
"""

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

# The carried state: one (h, c) per nn.LSTM of the stack, each (layers, batch, size).
State = list[tuple[torch.Tensor, torch.Tensor]]


def map_state(fn, state: State | None) -> State | None:
    """`fn` applied to every tensor of a state (detach, move, slice); None stays None."""
    return None if state is None else [(fn(h), fn(c)) for h, c in state]


def locked_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout of x (batch, steps, features) with one mask per sequence, the same at every step."""
    if not training or p == 0:
        return x
    mask = x.new_empty(x.size(0), 1, x.size(2)).bernoulli_(1 - p) / (1 - p)
    return x * mask


def embedding_dropout(embedding: nn.Embedding, x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Embeddings of x with whole words dropped: a dropped word is zero wherever it occurs in the batch."""
    if not training or p == 0:
        return embedding(x)
    keep = embedding.weight.new_empty(embedding.weight.size(0), 1).bernoulli_(1 - p) / (1 - p)
    return F.embedding(x, embedding.weight * keep)


class LSTMLanguageModel(nn.Module):
    """Word-level LSTM LM. Options beyond Zaremba's are AWD-LSTM's, all off by default.

    `dropout`: Zaremba's, a new mask per step on the embedding output, between layers and on the
    output. `input_dropout`, `hidden_dropout`, `output_dropout`: locked (variational) dropout at
    the same three places. `embedding_dropout`: drops whole words. `weight_drop`: DropConnect on
    each layer's hidden-to-hidden weights, a new mask per window. With `tie_weights` the decoder
    shares the embedding matrix; when `embedding_size` differs from `hidden_size` the last layer
    has `embedding_size` units, as in AWD-LSTM. `softmax="adaptive"`: a head over the ids below
    `cutoffs[0]` and one entry per tail cluster, the i-th cluster (from `cutoffs[i - 1]`) behind a
    projection of (last layer size) // div_value ** i units; ids run from frequent to rare, as the
    vocabulary's do.
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
        self.input_dropout, self.hidden_dropout, self.output_dropout = (
            input_dropout,
            hidden_dropout,
            output_dropout,
        )
        self.embedding_dropout, self.weight_drop = embedding_dropout, weight_drop
        self.embedding = nn.Embedding(vocab_size, embedding_size)
        self.dropout = nn.Dropout(dropout)
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
        self.decoder, self.adaptive_softmax = None, None
        if softmax == "full":
            self.decoder = nn.Linear(last_size, vocab_size)
            output_layer = self.decoder
        else:
            # torch's own module rather than a hand-written one: its head, tail projections and
            # `predict` are tested upstream. It offers no weight tying: its head and projections
            # cannot share the embedding matrix (that takes Baevski & Auli's adaptive input, not
            # built here), so lm.module refuses tie_weights with it.
            self.adaptive_softmax = nn.AdaptiveLogSoftmaxWithLoss(
                last_size, vocab_size, list(cutoffs), div_value, head_bias=True
            )
            output_layer = self.adaptive_softmax
        if init == "uniform":  # Zaremba: every weight uniform in [-init_scale, init_scale]
            for parameter in self.parameters():
                nn.init.uniform_(parameter, -init_scale, init_scale)
        elif init == "awd":  # AWD-LSTM: embedding and softmax weights uniform, bias 0, LSTM PyTorch's default
            nn.init.uniform_(self.embedding.weight, -init_scale, init_scale)
            for name, parameter in output_layer.named_parameters():
                if name.endswith("bias"):
                    nn.init.zeros_(parameter)
                else:
                    nn.init.uniform_(parameter, -init_scale, init_scale)
        if tie_weights:  # Press & Wolf (2017), Inan et al. (2017)
            self.decoder.weight = self.embedding.weight

    def hidden(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """The last layer's outputs (batch, steps, size), before output dropout, and the new state."""
        out = embedding_dropout(self.embedding, x, self.embedding_dropout, self.training)
        out = self.dropout(locked_dropout(out, self.input_dropout, self.training))
        new_state = []
        for i, rnn in enumerate(self.rnns):
            if i > 0:
                out = self.dropout(locked_dropout(out, self.hidden_dropout, self.training))
            out, layer_state = self._run(rnn, out, None if state is None else state[i])
            new_state.append(layer_state)
        return out, new_state

    def drop_output(self, out: torch.Tensor) -> torch.Tensor:
        return self.dropout(locked_dropout(out, self.output_dropout, self.training))

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """Logits (batch, steps, vocab) for token ids x (batch, steps); a None state means zeros."""
        out, state = self.hidden(x, state)
        return self.logits(self.drop_output(out)), state

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """The whole distribution (batch, steps, vocab) at each of the last layer's outputs: the
        decoder's logits, or the adaptive softmax's log-probabilities, already normalised and so
        logits as well (log_softmax, softmax and argmax read them alike)."""
        if self.decoder is not None:
            return self.decoder(features)
        with self._adaptive_input(features) as flat:
            return self.adaptive_softmax.log_prob(flat).view(*features.shape[:2], -1)

    def target_log_probs(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log p(target) (batch, steps) at each of the last layer's (dropped) outputs: the training
        path, which with the adaptive softmax computes only the head and the targets' clusters."""
        if self.decoder is not None:
            return _full_target_log_probs(self.decoder(features), targets)
        with self._adaptive_input(features) as flat:
            return self.adaptive_softmax(flat, targets.flatten()).output.view_as(targets)

    def evaluate_targets(
        self, features: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`target_log_probs` and the likeliest token at each position, for evaluation: from one
        set of logits, or with the adaptive softmax from torch's `predict`, which computes a tail
        cluster only where the head's best entry is that cluster."""
        if self.decoder is not None:
            logits = self.decoder(features)
            return _full_target_log_probs(logits, targets), logits.argmax(-1)
        with self._adaptive_input(features) as flat:
            likeliest = self.adaptive_softmax.predict(flat).view_as(targets)
        return self.target_log_probs(features, targets), likeliest

    @contextmanager
    def _adaptive_input(self, features: torch.Tensor) -> Iterator[torch.Tensor]:
        """Features as the adaptive softmax takes them: flat, in its weights' dtype, outside
        autocast. Under autocast torch's module mixes its input's dtype with log_softmax's and
        fails (index_copy_), and bfloat16 log-probabilities would lose the perplexity's digits."""
        with torch.autocast(features.device.type, enabled=False):
            yield features.flatten(0, 1).to(self.adaptive_softmax.head.weight.dtype)

    def _run(self, rnn: nn.LSTM, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None):
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
            out, h, c = torch.lstm(x, state, weights, True, 1, 0.0, True, False, True)
        return out, (h, c)


def _full_target_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) (batch, steps) under logits (batch, steps, vocab): minus PyTorch's cross-entropy."""
    return -F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
