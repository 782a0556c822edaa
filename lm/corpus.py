"""Tokens, vocabulary and cached id tensors of a text corpus (design.md, "Data")."""

import errno
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
CACHE_FORMAT = 3  # bump when tokenisation or the vocabulary order changes


@dataclass(frozen=True)
class Tokenizer:
    """How a line of text becomes tokens: words split on whitespace, or characters (a space is one).

    Every line is closed by `<eos>`; it travels with the vocabulary in checkpoints.
    """

    level: str = "word"
    lowercase: bool = False

    def __post_init__(self) -> None:
        if self.level not in ("word", "char"):
            raise UserError(f"data.level={self.level!r} is not a tokenisation level; use word or char.")

    def tokens(self, line: str) -> list[str]:
        words = (line.lower() if self.lowercase else line).split()
        return words if self.level == "word" else list(" ".join(words))

    def join(self, tokens: list[str]) -> str:
        """Tokens back into text, a line break for each `<eos>`."""
        lines, line = [], []
        for token in tokens:
            if token == EOS:
                lines.append(line)
                line = []
            else:
                line.append(token)
        separator = " " if self.level == "word" else ""
        return "\n".join(separator.join(line) for line in [*lines, line])


def read_tokens(path: Path, tokenizer: Tokenizer = Tokenizer()) -> list[str]:
    """The tokens of every line of a UTF-8 file, each line closed by `<eos>`."""
    return text_tokens(read_text(path), tokenizer)


def text_tokens(text: str, tokenizer: Tokenizer) -> list[str]:
    tokens: list[str] = []
    for line in text_lines(text):
        tokens.extend(tokenizer.tokens(line))
        tokens.append(EOS)
    return tokens


def text_lines(text: str) -> list[str]:
    """Lines ended by \\n, \\r\\n or \\r only: str.splitlines() also breaks at form feeds and
    Unicode separators, which would add sentences to a corpus and shift line numbers."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return lines[:-1] if lines[-1] == "" else lines


def read_text(path: Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is not a file.")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise UserError(
            f"{path} is not UTF-8: byte {error.start} (line {line}) is {data[error.start : error.end]!r}. "
            "Convert it, e.g. iconv -f latin1 -t utf-8."
        ) from error


class Vocabulary:
    """Token <-> id map in a deterministic order: descending count, ties alphabetical."""

    def __init__(self, tokens: list[str], tokenizer: Tokenizer = Tokenizer()):
        self.tokens = tokens
        self.tokenizer = tokenizer
        self.index = {token: i for i, token in enumerate(tokens)}
        self.unk_id = self.index[UNK]

    @classmethod
    def build(
        cls,
        train_tokens: list[str],
        tokenizer: Tokenizer = Tokenizer(),
        min_count: int = 1,
        max_vocab: int | None = None,
    ) -> "Vocabulary":
        """Tokens seen at least `min_count` times, the `max_vocab` most frequent (`<unk>` and
        `<eos>` included); the others become `<unk>`."""
        counts = Counter(train_tokens)
        counts.setdefault(UNK, 0)  # a corpus without <unk> still needs one for unseen words
        specials = [token for token in (UNK, EOS) if token in counts]
        words = [token for token in counts if token not in specials and counts[token] >= min_count]
        words.sort(key=lambda token: (-counts[token], token))
        if max_vocab is not None:
            words = words[: max(max_vocab - len(specials), 0)]
        return cls(sorted(words + specials, key=lambda token: (-counts[token], token)), tokenizer)

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, tokens: list[str]) -> torch.Tensor:
        unk_id, index = self.unk_id, self.index
        return torch.tensor([index.get(token, unk_id) for token in tokens], dtype=torch.long)

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


@dataclass
class Corpus:
    vocab: Vocabulary
    splits: dict[str, torch.Tensor]  # split name -> 1-D token ids

    def unknown_counts(self) -> dict[str, int]:
        return {name: int((ids == self.vocab.unk_id).sum()) for name, ids in self.splits.items()}


def load_corpus(
    files: dict[str, Path],
    cache_dir: Path,
    tokenizer: Tokenizer = Tokenizer(),
    min_count: int = 1,
    max_vocab: int | None = None,
) -> Corpus:
    """Tokenise `files` (one must be "train") or load the ids cached for exactly their content
    and these options."""
    options = {"tokenizer": tokenizer, "min_count": min_count, "max_vocab": max_vocab}
    cache_file = Path(cache_dir) / f"corpus-{_content_key(files, options)}.pt"
    if cache_file.exists():
        try:
            saved = torch.load(cache_file, weights_only=True)
            return Corpus(Vocabulary(saved["vocab"], tokenizer), saved["splits"])
        except Exception as error:  # a damaged cache is rebuilt, never trusted
            log.warning("Ignoring unreadable token cache %s (%s); rebuilding it.", cache_file, error)

    _check_writable(Path(cache_dir))  # before tokenising, which takes a while on a big corpus
    tokens = {name: read_tokens(path, tokenizer) for name, path in files.items()}
    vocab = Vocabulary.build(tokens["train"], tokenizer, min_count, max_vocab)
    corpus = Corpus(vocab, {name: vocab.encode(split) for name, split in tokens.items()})
    _save_atomically({"vocab": vocab.tokens, "splits": corpus.splits}, cache_file)
    return corpus


def _content_key(files: dict[str, Path], options: dict) -> str:
    digest = hashlib.sha256(f"format {CACHE_FORMAT} {sorted(options.items())}".encode())
    for name in sorted(files):
        digest.update(name.encode())
        digest.update(Path(files[name]).read_bytes())
    return digest.hexdigest()[:16]


def _check_writable(cache_dir: Path) -> None:
    """The nearest folder of `cache_dir` that exists must take new files; nothing is created yet."""
    existing = cache_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise _cache_error(cache_dir, f"{existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise _cache_error(cache_dir, f"{existing} is not writable")


def _cache_error(cache_dir: Path, reason: str, disk_full: bool = False) -> UserError:
    fix = "set data.cache_dir=PATH to a folder you can write"
    if disk_full:
        fix = "free some space, or set data.cache_dir=PATH on another disk"
    return UserError(f"data.cache_dir={cache_dir} cannot hold the token cache ({reason}): {fix}.")


def _save_atomically(obj: object, path: Path) -> None:
    """Write to a temporary file and rename, so a killed run or a full disk never leaves a
    half-written cache."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except OSError as error:  # read-only, no permission, full disk (EROFS, EACCES, EPERM, ENOSPC, ...)
        raise _cache_error(path.parent, error.strerror or str(error), error.errno == errno.ENOSPC) from error
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
