"""The network of Zaremba et al. (2014): embedding -> dropout -> LSTM -> dropout -> linear."""

import torch
from torch import nn

State = tuple[torch.Tensor, torch.Tensor]  # (h, c), each (num_layers, batch, hidden_size)


class LSTMLanguageModel(nn.Module):
    """Word-level LSTM LM; dropout only on non-recurrent connections, every weight uniform."""

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        num_layers: int,
        dropout: float,
        init_scale: float,
        tie_weights: bool = False,
    ):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        # nn.LSTM runs cuDNN on GPU; its `dropout` acts between layers only.
        self.lstm = nn.LSTM(hidden_size, hidden_size, num_layers, dropout=dropout, batch_first=True)
        self.decoder = nn.Linear(hidden_size, vocab_size)
        for parameter in self.parameters():
            nn.init.uniform_(parameter, -init_scale, init_scale)
        if tie_weights:  # Press & Wolf (2017); off in the Zaremba presets
            self.decoder.weight = self.embedding.weight

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """Logits (batch, steps, vocab) for token ids x (batch, steps); a None state means zeros."""
        out, state = self.lstm(self.dropout(self.embedding(x)), state)
        return self.decoder(self.dropout(out)), state
