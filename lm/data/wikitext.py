"""Find, download and verify WikiText-2 and WikiText-103 (Merity et al. 2016), tokenised form."""

import http.client
import logging
import shutil
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from lm.data.download import fetch, keep, scratch_folder
from lm.data.ptb import SPLITS
from lm.data.text import PIECE_BYTES, Tokenizer, text_pieces
from lm.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WikiText:
    """What Salesforce published about one of the datasets: where it is and how big it is."""

    title: str
    url: str
    folder: str  # the folder inside the zip that holds the split files
    tokens: dict[str, int]  # per split, every line (blank ones too) closed by <eos>, split on whitespace
    types: int  # the vocabulary of the train split, <unk> and <eos> included


# The archives' MD5 sums are not pinned yet (no copy here was checked against a published one), so a
# download is verified by the published token counts instead: the numbers that AWD-LSTM's reading of
# the files gives and that every published perplexity is computed over.
DATASETS = {
    "wikitext2": WikiText(
        title="WikiText-2",
        url="https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip",
        folder="wikitext-2/",
        tokens={"train": 2_088_628, "valid": 217_646, "test": 245_569},
        types=33_278,
    ),
    "wikitext103": WikiText(
        title="WikiText-103",
        url="https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip",
        folder="wikitext-103/",
        tokens={"train": 103_227_021, "valid": 217_646, "test": 245_569},
        types=267_735,
    ),
}


def wikitext_files(data_dir: Path) -> dict[str, Path]:
    return {split: Path(data_dir) / f"wiki.{split}.tokens" for split in SPLITS}


def dataset(name: str) -> WikiText:
    if name not in DATASETS:
        raise UserError(f"data.name={name!r} is not a WikiText dataset; use one of {', '.join(DATASETS)}.")
    return DATASETS[name]


def ensure_wikitext(data_dir: Path, name: str, url: str) -> dict[str, Path]:
    """Return the three wiki.<split>.tokens files in `data_dir`, downloading only those missing.

    Downloaded files must have the published token counts, or they are not kept; files the user
    put there are used as they are (`check_published_counts` warns once the corpus is read), so a
    variant of WikiText can still be trained on. Nothing already in `data_dir` is overwritten.
    """
    info = dataset(name)
    files = wikitext_files(data_dir)
    missing = [split for split, path in files.items() if not path.exists()]
    if missing:
        _download(info, missing, files, url)
    return files


def count_tokens(path: Path, piece_bytes: int = PIECE_BYTES) -> int:
    """Tokens of a UTF-8 file as `lm.data.text.text_tokens` gives them at word level, `<eos>` included,
    read in pieces of whole lines: the words of a piece are its lines' words, a line break being
    whitespace to str.split, and each line (the last one too, ended or not) adds an `<eos>`."""
    pieces = text_pieces(path, piece_bytes=piece_bytes)
    return sum(len(text.split()) + text.count("\n") + (not text.endswith("\n")) for text in pieces)


def check_published_counts(
    name: str,
    files: dict[str, Path],
    token_counts: dict[str, int],
    vocab_size: int,
    tokenizer: Tokenizer,
    min_count: int,
    max_vocab: int | None,
) -> None:
    """Warn when the corpus read is not the published one: its perplexities would not compare.

    `token_counts`: each split's tokens, `<eos>` included; `vocab_size`: the vocabulary built from
    the train split with these options.
    """
    info = dataset(name)
    if tokenizer.level != "word":
        return  # the published counts are of words: a character-level corpus is meant to differ
    for split, found in token_counts.items():
        if found != info.tokens[split]:
            log.warning(
                "%s has %d tokens (with <eos>), not the published %d of %s; its perplexities are not "
                "comparable with the published ones.",
                files[split],
                found,
                info.tokens[split],
                info.title,
            )
    # Only the published options give the published vocabulary; any other is a choice, not a fault.
    if not tokenizer.lowercase and min_count == 1 and max_vocab is None and vocab_size != info.types:
        log.warning(
            "The vocabulary of %s has %d types, not the published %d of %s; perplexities are not "
            "comparable with the published ones.",
            files["train"],
            vocab_size,
            info.types,
            info.title,
        )


def _download(info: WikiText, splits: list[str], files: dict[str, Path], url: str) -> None:
    data_dir = files[splits[0]].parent
    wanted = ", ".join(files[split].name for split in splits)
    names = "wiki.train.tokens, wiki.valid.tokens and wiki.test.tokens"
    fix = f"Set data.dir=PATH to a folder holding {names}."
    with scratch_folder(data_dir, f"{info.title} files missing ({wanted})", fix) as scratch:
        log.info("Downloading %s of %s from %s into %s", wanted, info.title, url, data_dir)
        archive = scratch / "wikitext.zip"
        try:
            fetch(url, archive)
        except (OSError, http.client.HTTPException, ValueError) as error:  # URLError is an OSError
            raise UserError(
                f"{info.title} files missing in data.dir={data_dir} ({wanted}) and the download from "
                f"data.url={url} failed ({error}). Put {names} of {info.title} in that folder, or set "
                "data.url to a copy of the zip you can reach."
            ) from error
        try:
            extracted = _extract(archive, info, splits, files, scratch)
        except (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError) as error:
            raise UserError(
                f"The download from data.url={url} is not a complete {info.title} zip ({error}); nothing "
                f"was kept in data.dir={data_dir}. Retry, or put {names} there yourself."
            ) from error
        except OSError as error:  # a full disk, most likely: WikiText-103's train file is 540 MB
            raise UserError(
                f"Extracting {wanted} from the {info.title} zip into data.dir={data_dir} failed "
                f"({error.strerror or error}); nothing was kept. Free some space, or set data.dir=PATH "
                f"to a folder on another disk."
            ) from error
        for split, path in extracted.items():
            try:
                found = count_tokens(path)
            except UserError:
                found = None  # not UTF-8: not the published file either
            if found != info.tokens[split]:
                what = "is not UTF-8" if found is None else f"has {found} tokens (with <eos>)"
                raise UserError(
                    f"{files[split].name} downloaded from data.url={url} differs from the published "
                    f"{info.title}: it {what}, the published one {info.tokens[split]}. It was not kept "
                    f"in data.dir={data_dir}; retry, or put the published {names} there yourself."
                )
        for path in keep(extracted, files):
            log.warning("%s appeared during the download; kept it, not the downloaded one.", path)


def _extract(
    archive: Path, info: WikiText, splits: list[str], files: dict[str, Path], into: Path
) -> dict[str, Path]:
    """Stream only the requested wiki.<split>.tokens members out of the zip to our own names (no path
    from the archive is trusted); a CRC error raises BadZipFile as the member is read."""
    extracted = {}
    with zipfile.ZipFile(archive) as zf:
        members = [member for member in zf.infolist() if not member.is_dir()]
        for split in splits:
            name = files[split].name
            official = [member for member in members if member.filename == info.folder + name]
            found = official or [member for member in members if member.filename.endswith("/" + name)]
            if not found:
                raise zipfile.BadZipFile(f"it has no {info.folder}{name}")
            target = into / name
            with zf.open(found[0]) as source, open(target, "wb") as f:
                shutil.copyfileobj(source, f)
            extracted[split] = target
    return extracted
