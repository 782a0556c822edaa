"""A corpus prepared once into memory-mapped token ids (docs/data.md, "Large corpora").

Its files are read in pieces of whole lines, the training split's words counted and every split's
ids written to a flat file of uint16 (or uint32, for a vocabulary above 65,536 types). Later starts
map those files into memory; nothing is tokenised again, and no process reads more of them than
the rows it trains on.
"""

import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lm.data import cache_check
from lm.data.text import EOS, PIECE_BYTES, Tokenizer, line_ranges, text_pieces
from lm.data.vocabulary import Vocabulary
from lm.errors import UserError

log = logging.getLogger(__name__)

# Bump when tokenisation, the vocabulary order or the prepared files change: the options, and so
# every record's and folder's name, change with it, and older caches are prepared again (5: meta.json
# holds the content key, the options, the text's sizes and each split's checksum).
CACHE_FORMAT = 5


@dataclass
class Corpus:
    """The vocabulary, each split's ids (1-D, memory-mapped uint16 or uint32; windows read them as
    int64) and, counted when prepared, each split's `<unk>` and `<eos>` tokens."""

    vocab: Vocabulary
    splits: dict[str, torch.Tensor]
    unknown: dict[str, int]
    eos: dict[str, int]
    folder: Path  # the prepared files

    def __reduce__(self):
        # A process that receives the corpus (ddp_spawn pickles the datamodule) maps the files
        # itself: torch cannot send a file-mapped storage to another process.
        return _reopen, (self.folder, self.vocab.tokenizer)


def _reopen(folder: Path, tokenizer: Tokenizer) -> Corpus:
    claims = {"key": folder.name.removeprefix("corpus-")}
    corpus = _open(folder, tokenizer, claims, "the process that sent it")
    if corpus is None:
        raise UserError(
            f"The prepared corpus {folder} was damaged while this run used it; start the run again."
        )
    return corpus


def load_corpus(
    files: dict[str, Path],
    cache_dir: Path,
    tokenizer: Tokenizer = Tokenizer(),
    min_count: int = 1,
    max_vocab: int | None = None,
) -> Corpus:
    """The corpus of `files` (one must be "train"), prepared in `cache_dir` for exactly their
    content and these options: opened when prepared already, prepared otherwise."""
    cache_dir = Path(cache_dir)
    options = {"format": CACHE_FORMAT, "level": tokenizer.level, "lowercase": tokenizer.lowercase}
    options |= {"min_count": min_count, "max_vocab": max_vocab}
    files = {name: Path(path).resolve() for name, path in files.items()}
    # Which prepared corpus these files were last time, recorded by path and stat signature so that
    # an unchanged corpus opens without reading its text (see `cache_check.signature`). The
    # folder's meta.json must agree with what the record claims, or the text is hashed again.
    sources = json.dumps([options, sorted((name, str(path)) for name, path in files.items())])
    record_file = cache_dir / f"sources-{hashlib.sha256(sources.encode()).hexdigest()[:16]}.json"
    taken_ns = time.time_ns()
    signatures = {name: cache_check.signature(path) for name, path in files.items()}
    claims = {"options": options, "text_bytes": {name: sig[0] for name, sig in signatures.items()}}
    record, corpus, tried = cache_check.read_json(record_file), None, None
    if record and record.get("signatures") == signatures and cache_check.settled(record):
        tried = cache_dir / f"corpus-{record.get('key')}"
        corpus = _open(tried, tokenizer, claims | {"key": record.get("key")}, record_file.name)
    if corpus is None:
        key = _content_key(files, options)
        folder = cache_dir / f"corpus-{key}"
        if folder.exists() and folder != tried:
            corpus = _open(folder, tokenizer, claims | {"key": key}, "the text's content key")
        if corpus is None:
            corpus = _prepared(files, folder, tokenizer, claims | {"key": key})
        try:
            cache_check.write_json({"signatures": signatures, "taken_ns": taken_ns, "key": key}, record_file)
        except OSError as error:
            raise cache_check.cache_error(cache_dir, error) from error
    log.info("the token ids of %s are in %s", files["train"].parent, corpus.folder)
    return corpus


def _content_key(files: dict[str, Path], options: dict) -> str:
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for name in sorted(files):
        digest.update(name.encode())
        with open(files[name], "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()[:16]


def _prepared(files: dict[str, Path], folder: Path, tokenizer: Tokenizer, claims: dict) -> Corpus:
    """Prepare `folder` under its lock, unless another process prepared it meanwhile."""
    cache_check.check_writable(folder.parent)  # before tokenising, which takes a while on a big corpus
    before = _identity(folder)
    try:
        with cache_check.locked(folder.with_name(f".{folder.name}.lock"), f"preparing {folder}"):
            corpus = None
            if _identity(folder) not in (None, before):  # another process prepared it meanwhile
                corpus = _open(folder, tokenizer, claims, "the text's content key")
            if corpus is None:
                _prepare(files, folder, tokenizer, claims)
                corpus = _open(folder, tokenizer, claims, "the text's content key")
    except OSError as error:  # the lock file cannot be made
        raise cache_check.cache_error(folder.parent, error) from error
    if corpus is None:
        raise UserError(f"The corpus prepared in {folder} does not read back: see the warning above.")
    return corpus


def _identity(folder: Path) -> int | None:
    try:
        return folder.stat().st_ino
    except FileNotFoundError:
        return None


def _prepare(files: dict[str, Path], folder: Path, tokenizer: Tokenizer, claims: dict) -> None:
    """Count and encode every split into a new folder, then rename it into place in one step. Its
    meta.json holds `claims` (what it was prepared from, the options included) and each split's
    checksum."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.partial-"))
    except OSError as error:
        raise cache_check.cache_error(folder.parent, error) from error
    try:
        options = claims["options"]
        vocab, stats = _encode_splits(files, work, tokenizer, options["min_count"], options["max_vocab"])
        cache_check.write_json(vocab.tokens, work / "vocab.json")
        for name, split in stats.items():
            split[cache_check.CHECKSUM] = cache_check.checksum(work / f"{name}.bin")
        cache_check.write_json(claims | {"dtype": vocab.id_dtype.str, "splits": stats}, work / "meta.json")
        if folder.exists():  # a damaged earlier preparation: set aside, then removed
            shutil.rmtree(folder.rename(work.with_name(work.name + "-old")))
        work.rename(folder)
    except OSError as error:  # read-only, no permission, full disk (EROFS, EACCES, EPERM, ENOSPC, ...)
        raise cache_check.cache_error(folder.parent, error) from error
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _encode_splits(
    files: dict[str, Path], work: Path, tokenizer: Tokenizer, min_count: int, max_vocab: int | None
) -> tuple[Vocabulary, dict]:
    """The training split in one pass over its text, on every core: each part of the file gets
    provisional ids in the order its tokens first appear, written to disk and counted; once
    the parts' counts are summed, the vocabulary's order is known and a lookup table per part
    renumbers its ids into train.bin. The other splits are encoded with the vocabulary."""
    train = files["train"]
    ranges = line_ranges(train, _workers(train))
    parts = [work / f"train.{k}.provisional" for k in range(len(ranges))]
    jobs = [(train, *span, tokenizer, part) for span, part in zip(ranges, parts, strict=True)]
    started = time.perf_counter()
    if len(jobs) == 1:
        results = [_provisional_ids(*jobs[0], progress=True)]
    else:  # forked, as DataLoader workers are: the children run numpy and Python only, no torch
        with ProcessPoolExecutor(len(jobs) - 1, mp_context=multiprocessing.get_context("fork")) as pool:
            others = [pool.submit(_provisional_ids, *job) for job in jobs[1:]]
            results = [_provisional_ids(*jobs[0], progress=True), *(other.result() for other in others)]
    counts: Counter[str] = Counter()
    for words, part_counts in results:
        counts.update(dict(zip(words, part_counts.tolist(), strict=True)))
    vocab = Vocabulary.from_counts(counts, tokenizer, min_count, max_vocab)
    stats: dict = {}
    with open(work / "train.bin", "wb") as f:
        for (words, _), part in zip(results, parts, strict=True):
            renumber = vocab.encode_array(words, vocab.id_dtype)
            for ids in _pieces_of(part, np.uint32):
                stats = _add_stats(stats, _write(f, renumber[ids]), vocab)
            part.unlink()
    how = f"in {len(jobs)} processes" if len(jobs) > 1 else "in 1 process"
    _log_pace(train, stats.get("tokens", 0), started, how)
    splits = {"train": stats}
    for name in sorted(set(files) - {"train"}):
        stats, started = {}, time.perf_counter()
        with open(work / f"{name}.bin", "wb") as f:
            for text in text_pieces(files[name]):
                ids = vocab.encode_array(tokenizer.piece_tokens(text), vocab.id_dtype)
                stats = _add_stats(stats, _write(f, ids), vocab)
        _log_pace(files[name], stats.get("tokens", 0), started)
        splits[name] = stats
    return vocab, {name: stats or {"tokens": 0, "unknown": 0, "eos": 0} for name, stats in splits.items()}


def _workers(path: Path) -> int:
    """One process per core for a big file; one for a small one, which spawning would only slow."""
    if "fork" not in multiprocessing.get_all_start_methods():
        return 1
    return max(1, min(len(os.sched_getaffinity(0)), path.stat().st_size // (4 * PIECE_BYTES)))


def _provisional_ids(
    path: Path, start: int, end: int, tokenizer: Tokenizer, out: Path, progress: bool = False
) -> tuple[list[str], np.ndarray]:
    """Tokens of bytes [start, end) of `path` as provisional ids in `out` (uint32), and the
    distinct tokens in id order with their counts. A defaultdict whose factory is a counter gives
    each new token the next id, in C: no Python code runs per token."""
    provisional: defaultdict[str, int] = defaultdict(itertools.count().__next__)
    counts = np.zeros(0, dtype=np.int64)
    done, tokens, started, last = 0, 0, time.perf_counter(), time.perf_counter()
    with open(out, "wb") as f:
        for text in text_pieces(path, start, end):
            piece = tokenizer.piece_tokens(text)
            ids = np.fromiter(map(provisional.__getitem__, piece), dtype=np.uint32, count=len(piece))
            counts = np.pad(counts, (0, len(provisional) - len(counts)))
            counts += np.bincount(ids, minlength=len(counts))
            _write(f, ids)
            done, tokens = done + len(text), tokens + len(piece)
            if progress and time.perf_counter() - last > 10:
                last = time.perf_counter()
                log.info(
                    "preparing %s: %.0f%% of the first part read, %d tokens (%.1fM tokens/s per process)",
                    path.name,
                    100 * done / max(end - start, 1),
                    tokens,
                    tokens / (last - started) / 1e6,
                )
    return list(provisional), counts


def _add_stats(stats: dict, ids: np.ndarray, vocab: Vocabulary) -> dict:
    eos = vocab.index.get(EOS, -1)
    counts = {"tokens": len(ids), "unknown": int((ids == vocab.unk_id).sum()), "eos": int((ids == eos).sum())}
    return {key: stats.get(key, 0) + value for key, value in counts.items()}


def _log_pace(path: Path, tokens: int, started: float, how: str = "in 1 process") -> None:
    seconds = max(time.perf_counter() - started, 1e-9)
    log.info(
        "prepared %s: %d tokens in %.1f s (%.1fM tokens/s) %s",
        path.name,
        tokens,
        seconds,
        tokens / seconds / 1e6,
        how,
    )


def _pieces_of(path: Path, dtype: type, count: int = PIECE_BYTES) -> Iterator[np.ndarray]:
    with open(path, "rb") as f:
        while len(ids := np.fromfile(f, dtype=dtype, count=count)):
            yield ids


def _write(f, ids: np.ndarray) -> np.ndarray:
    f.write(memoryview(ids))
    return ids


def _open(folder: Path, tokenizer: Tokenizer, claims: dict, claimed_by: str) -> Corpus | None:
    """The prepared corpus in `folder`, its ids memory-mapped, if its meta.json says it was prepared
    as `claims` (by `claimed_by`) says and its ids are intact; otherwise None, with a warning."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if disagree := [
            f"{what} {meta.get(what)}, not {value}"
            for what, value in claims.items()
            if meta.get(what) != value
        ]:
            log.warning(
                "Not trusting %s, named by %s: its meta.json says %s.",
                folder,
                claimed_by,
                "; ".join(disagree),
            )
            return None
        tokens = json.loads((folder / "vocab.json").read_text())
        dtype = np.dtype(meta["dtype"])
        bins = {name: folder / f"{name}.bin" for name in meta["splits"]}
        for name, stats in meta["splits"].items():
            if (size := bins[name].stat().st_size) != stats["tokens"] * dtype.itemsize:
                raise ValueError(f"{name}.bin holds {size} bytes, not {stats['tokens']} ids")
        checksums = {name: stats[cache_check.CHECKSUM] for name, stats in meta["splits"].items()}
        if altered := cache_check.altered_ids(bins, checksums, folder / "verified.json"):
            raise ValueError(f"{', '.join(f'{name}.bin' for name in altered)} changed since prepared")
        splits = {name: _mapped(bins[name], stats["tokens"], dtype) for name, stats in meta["splits"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:  # rebuilt, never trusted
        log.warning("Ignoring the damaged prepared corpus %s (%s); preparing it again.", folder, error)
        return None
    stats = meta["splits"]
    return Corpus(
        Vocabulary(tokens, tokenizer),
        splits,
        {name: s["unknown"] for name, s in stats.items()},
        {name: s["eos"] for name, s in stats.items()},
        folder,
    )


def _mapped(path: Path, count: int, dtype: np.dtype) -> torch.Tensor:
    """The ids of `path`, mapped copy-on-write: pages are read when touched, never written back."""
    torch_dtype = torch.uint16 if dtype.itemsize == 2 else torch.uint32
    if count == 0:  # an empty file cannot be mapped
        return torch.empty(0, dtype=torch_dtype)
    return torch.from_file(str(path), shared=False, size=count, dtype=torch_dtype)
