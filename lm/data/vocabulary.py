"""The vocabulary: token <-> id in a fixed order, built from the training split's counts (docs/design.md,
"Data"). It travels with every checkpoint, so that using a model never needs its training data."""

import itertools
from collections.abc import Mapping

import numpy as np
import torch

from lm.data.text import EOS, UNK, Tokenizer


class Vocabulary:
    """Token <-> id map in a deterministic order: descending count, ties alphabetical."""

    def __init__(self, tokens: list[str], tokenizer: Tokenizer = Tokenizer()):
        self.tokens = tokens
        self.tokenizer = tokenizer
        self.index = {token: i for i, token in enumerate(tokens)}
        self.unk_id = self.index[UNK]

    @classmethod
    def from_counts(
        cls,
        counts: Mapping[str, int],
        tokenizer: Tokenizer = Tokenizer(),
        min_count: int = 1,
        max_vocab: int | None = None,
    ) -> "Vocabulary":
        """Tokens seen at least `min_count` times, the `max_vocab` most frequent (`<unk>` and
        `<eos>` included); the others become `<unk>`."""
        counts = dict(counts)
        counts.setdefault(UNK, 0)  # a corpus without <unk> still needs one for unseen words
        specials = [token for token in (UNK, EOS) if token in counts]
        words = [token for token in counts if token not in specials and counts[token] >= min_count]
        words.sort(key=lambda token: (-counts[token], token))
        if max_vocab is not None:
            words = words[: max(max_vocab - len(specials), 0)]
        return cls(sorted(words + specials, key=lambda token: (-counts[token], token)), tokenizer)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def id_dtype(self) -> np.dtype:
        """The narrowest unsigned type that holds every id: the prepared files' element type."""
        return np.dtype("<u2") if len(self) <= 1 << 16 else np.dtype("<u4")

    def encode(self, tokens: list[str]) -> torch.Tensor:
        return torch.from_numpy(self.encode_array(tokens, np.dtype(np.int64)))

    def encode_array(self, tokens: list[str], dtype: np.dtype) -> np.ndarray:
        lookup = map(self.index.get, tokens, itertools.repeat(self.unk_id))
        return np.fromiter(lookup, dtype=dtype, count=len(tokens))

    def unknown(self, tokens: list[str]) -> list[str]:
        """The distinct tokens that will be read as `<unk>`, sorted."""
        return sorted({token for token in tokens if token not in self.index})

    def decode(self, ids: torch.Tensor) -> list[str]:
        return [self.tokens[i] for i in ids.tolist()]

    def state_dict(self) -> dict:
        """What a checkpoint keeps, so that using a model never needs its training data."""
        return {"tokens": self.tokens, "level": self.tokenizer.level, "lowercase": self.tokenizer.lowercase}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Vocabulary":
        return cls(state["tokens"], Tokenizer(state["level"], state["lowercase"]))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.state_dict() == other.state_dict()
