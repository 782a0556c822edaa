"""AWD-LSTM's dropouts (Merity et al. 2017): one mask per sequence, and whole words."""

import torch
import torch.nn.functional as F
from torch import nn


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
