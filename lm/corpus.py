"""Tokens, vocabulary and cached id tensors of a text corpus (design.md, "Data")."""

import hashlib
import logging
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from lm.errors import UserError

log = logging.getLogger(__name__)

EOS = "<eos>"
UNK = "<unk>"
CACHE_FORMAT = 1  # bump when tokenisation or the vocabulary order changes


def read_tokens(path: Path) -> list[str]:
    """Whitespace-split words of every line, each line closed by `<eos>`."""
    tokens: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            tokens.extend(line.split())
            tokens.append(EOS)
    return tokens


class Vocabulary:
    """Token <-> id map in a deterministic order: descending count, ties alphabetical."""

    def __init__(self, tokens: list[str]):
        self.tokens = tokens
        self.index = {token: i for i, token in enumerate(tokens)}
        self.unk_id = self.index[UNK]

    @classmethod
    def build(cls, train_tokens: list[str]) -> "Vocabulary":
        counts = Counter(train_tokens)
        counts.setdefault(UNK, 0)  # a corpus without <unk> still needs one for unseen words
        return cls(sorted(counts, key=lambda token: (-counts[token], token)))

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, tokens: list[str]) -> torch.Tensor:
        unk_id, index = self.unk_id, self.index
        return torch.tensor([index.get(token, unk_id) for token in tokens], dtype=torch.long)

    def decode(self, ids: torch.Tensor) -> list[str]:
        return [self.tokens[i] for i in ids.tolist()]


@dataclass
class Corpus:
    vocab: Vocabulary
    splits: dict[str, torch.Tensor]  # split name -> 1-D token ids

    def unknown_counts(self) -> dict[str, int]:
        return {name: int((ids == self.vocab.unk_id).sum()) for name, ids in self.splits.items()}


def load_corpus(files: dict[str, Path], cache_dir: Path) -> Corpus:
    """Tokenise `files` (one must be "train") or load the ids cached for exactly their content."""
    cache_file = Path(cache_dir) / f"corpus-{_content_key(files)}.pt"
    if cache_file.exists():
        try:
            saved = torch.load(cache_file, weights_only=True)
            return Corpus(Vocabulary(saved["vocab"]), saved["splits"])
        except Exception as error:  # a damaged cache is rebuilt, never trusted
            log.warning("Ignoring unreadable token cache %s (%s); rebuilding it.", cache_file, error)

    tokens = {name: read_tokens(path) for name, path in files.items()}
    vocab = Vocabulary.build(tokens["train"])
    corpus = Corpus(vocab, {name: vocab.encode(split) for name, split in tokens.items()})
    _save_atomically({"vocab": vocab.tokens, "splits": corpus.splits}, cache_file)
    return corpus


def _content_key(files: dict[str, Path]) -> str:
    digest = hashlib.sha256(f"format {CACHE_FORMAT}".encode())
    for name in sorted(files):
        digest.update(name.encode())
        digest.update(Path(files[name]).read_bytes())
    return digest.hexdigest()[:16]


def _save_atomically(obj: object, path: Path) -> None:
    """Write to a temporary file and rename, so a killed run never leaves a half-written cache."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    except OSError as error:
        raise UserError(
            f"Cannot write the token cache in {path.parent} ({error.strerror}); "
            "set data.cache_dir=PATH to a writable folder."
        ) from error
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
