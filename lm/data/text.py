"""Text and tokens: how a line becomes tokens, and how a UTF-8 file is read in pieces of whole lines
(docs/design.md, "Data")."""

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lm.errors import UserError

EOS = "<eos>"
UNK = "<unk>"
PIECE_BYTES = 1 << 24  # text read and tokenised at a time: memory stays flat whatever the corpus size


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

    def piece_tokens(self, text: str) -> list[str]:
        """The tokens of whole lines ended by \\n (the last one may lack it), `<eos>` closing each.

        The same tokens as `tokens` line by line, `<eos>` appended; for words, in one C-level
        split of the whole piece, since a line break is whitespace to `str.split` too.
        """
        if self.lowercase:
            text = text.lower()
        if not text.endswith("\n"):
            text += "\n"
        if self.level == "word":
            return text.replace("\n", f" {EOS} ").split()
        tokens: list[str] = []
        for line in text[:-1].split("\n"):
            tokens.extend(" ".join(line.split()))
            tokens.append(EOS)
        return tokens

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
    return "".join(text_pieces(path, piece_bytes=None))


def text_pieces(
    path: Path, start: int = 0, end: int | None = None, piece_bytes: int | None = PIECE_BYTES
) -> Iterator[str]:
    """The text of a UTF-8 file's bytes [start, end) (both at line starts) in pieces of whole
    lines (all at once for None), line ends as \n.

    A piece is cut after a \n byte, which no multi-byte UTF-8 character contains, so neither a
    character nor a \r\n is ever split.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is not a file.")
    offset, rest = start, b""
    with open(path, "rb") as f:
        f.seek(start)
        while True:
            size = piece_bytes or -1
            if end is not None:
                size = end - f.tell() if size < 0 else min(size, end - f.tell())
            block = f.read(size)
            data = rest + block
            cut = data.rfind(b"\n") + 1 if block else len(data)
            piece, rest = data[:cut], data[cut:]
            if piece:
                try:
                    text = piece.decode("utf-8")
                except UnicodeDecodeError as error:
                    at = offset + error.start
                    raise UserError(
                        f"{path} is not UTF-8: byte {at} (line {_line_at(path, at)}) is "
                        f"{piece[error.start : error.end]!r}. Convert it, e.g. iconv -f latin1 -t utf-8."
                    ) from error
                yield text.replace("\r\n", "\n").replace("\r", "\n")
                offset += len(piece)
            if not block:
                return


def _line_at(path: Path, offset: int) -> int:
    """The 1-based line of a byte offset (for an error message only: it reads up to there)."""
    lines, done = 1, 0
    with open(path, "rb") as f:
        while done < offset and (block := f.read(min(PIECE_BYTES, offset - done))):
            lines, done = lines + block.count(b"\n"), done + len(block)
    return lines


def line_ranges(path: Path, parts: int) -> list[tuple[int, int]]:
    """About equal byte ranges of a file, each starting at a line start."""
    size, cuts = path.stat().st_size, [0]
    with open(path, "rb") as f:
        for k in range(1, parts):
            f.seek(max(size * k // parts - 1, cuts[-1]))
            f.readline()  # on to the next line start (a \r-only file stays one range)
            cuts.append(max(f.tell(), cuts[-1]))
    return [(a, b) for a, b in zip(cuts, [*cuts[1:], size], strict=True) if b > a] or [(0, 0)]
