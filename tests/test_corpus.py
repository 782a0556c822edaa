"""docs/design.md, "Data": tokens, vocabulary and the token cache."""

import errno
import os
import pickle
import re
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import pytest
import torch

from lm.data import cache_check
from lm.data import prepared as preparation
from lm.data.prepared import load_corpus
from lm.data.ptb import ptb_files
from lm.data.text import EOS, UNK, Tokenizer, text_lines
from lm.errors import UserError
from tests.conftest import build_vocabulary, read_tokens, write_corpus


def test_ptb_vocabulary_and_token_counts(ptb_dir, tmp_path):
    ptb = load_corpus(ptb_files(ptb_dir), tmp_path)
    assert len(ptb.vocab) == 10_000
    assert {name: len(ids) for name, ids in ptb.splits.items()} == {
        "train": 929_589,
        "valid": 73_760,
        "test": 82_430,
    }
    assert ptb.vocab.tokens[:4] == ["the", UNK, EOS, "N"]  # by descending count


def test_ids_are_deterministic_and_ties_alphabetical():
    vocab = build_vocabulary("b a c a b d".split())
    assert vocab.tokens == ["a", "b", "c", "d", UNK]  # counts 2, 2, 1, 1, and <unk> unseen
    assert build_vocabulary("d c b a b a".split()).tokens == vocab.tokens
    assert vocab.encode("a d zebra".split()).tolist() == [0, 3, 4]
    assert vocab.decode(torch.tensor([1, 2])) == ["b", "c"]


def test_lines_end_with_eos_and_unseen_words_become_unk(tmp_path):
    folder = write_corpus(tmp_path, {"train": ["x y", "y"], "valid": ["y z"], "test": ["x"]})
    text = load_corpus(ptb_files(folder), tmp_path / "cache")
    assert text.vocab.decode(text.splits["train"]) == ["x", "y", EOS, "y", EOS]
    assert text.vocab.decode(text.splits["valid"]) == ["y", UNK, EOS]
    assert text.unknown == {"train": 0, "valid": 1, "test": 0}


def forbid(monkeypatch, name: str, what: str) -> None:
    def fail(*args, **kwargs):
        raise AssertionError(f"{what}: {args[:1]}")

    monkeypatch.setattr(preparation, name, fail)


def test_a_second_start_opens_the_prepared_ids_without_reading_the_text(tmp_path, monkeypatch):
    folder = write_corpus(tmp_path, {"train": ["a b c"], "valid": ["a"], "test": ["b"]})
    monkeypatch.setattr(cache_check, "TIMESTAMP_SLACK_NS", 0)  # the files are seconds old, not minutes
    first = load_corpus(ptb_files(folder), tmp_path / "cache")
    forbid(monkeypatch, "_content_key", "hashed the text again")
    forbid(monkeypatch, "_encode_splits", "tokenised again")
    monkeypatch.setattr(cache_check, "checksum", lambda path: pytest.fail(f"read every id of {path}"))
    cached = load_corpus(ptb_files(folder), tmp_path / "cache")
    assert cached.vocab.tokens == first.vocab.tokens
    assert all(torch.equal(cached.splits[k], first.splits[k]) for k in first.splits)
    assert cached.splits["train"].dtype == torch.uint16


def test_an_edit_is_seen_even_with_the_same_size_and_the_old_mtime(tmp_path, monkeypatch):
    folder = write_corpus(tmp_path, {"train": ["a b c"], "valid": ["a"], "test": ["b"]})
    monkeypatch.setattr(cache_check, "TIMESTAMP_SLACK_NS", 0)
    load_corpus(ptb_files(folder), tmp_path / "cache")
    train = folder / "ptb.train.txt"
    before = train.stat()
    train.write_text(" a b d \n")  # same size
    os.utime(train, ns=(before.st_atime_ns, before.st_mtime_ns))  # as `touch -d` or `cp -p` would
    assert "d" in load_corpus(ptb_files(folder), tmp_path / "cache").vocab.tokens


def test_a_file_changed_within_a_timestamp_tick_of_its_signature_is_hashed_again(tmp_path, monkeypatch):
    # A file system with whole-second times and no ctime or inode to go by: a rewrite of the same
    # size in the same second keeps the signature, so a fresh signature must not be trusted.
    def coarse(path):
        return [path.stat().st_size, path.stat().st_mtime_ns // 10**9 * 10**9, 0, 0, 0]

    monkeypatch.setattr(cache_check, "signature", coarse)
    folder = write_corpus(tmp_path, {"train": ["a b c"], "valid": ["a"], "test": ["b"]})
    second = (folder / "ptb.train.txt").stat().st_mtime_ns // 10**9 * 10**9
    load_corpus(ptb_files(folder), tmp_path / "cache")
    (folder / "ptb.train.txt").write_text(" a b d \n")
    os.utime(folder / "ptb.train.txt", ns=(second, second))
    assert "d" in load_corpus(ptb_files(folder), tmp_path / "cache").vocab.tokens


def test_the_same_text_elsewhere_reuses_the_prepared_ids(tmp_path, monkeypatch):
    folder = write_corpus(tmp_path / "one", {"train": ["a b c"], "valid": ["a"], "test": ["b"]})
    first = load_corpus(ptb_files(folder), tmp_path / "cache")
    copy = write_corpus(tmp_path / "two", {"train": ["a b c"], "valid": ["a"], "test": ["b"]})
    forbid(monkeypatch, "_encode_splits", "tokenised identical text again")
    assert load_corpus(ptb_files(copy), tmp_path / "cache").vocab.tokens == first.vocab.tokens
    assert len(list((tmp_path / "cache").glob("corpus-*"))) == 1


def test_the_ids_are_mapped_from_the_prepared_file_not_read_into_memory(tmp_path):
    folder = write_corpus(tmp_path, {"train": ["a b c"] * 1000, "valid": ["a"], "test": ["b"]})
    ids = load_corpus(ptb_files(folder), tmp_path / "cache").splits["train"]
    (prepared,) = (tmp_path / "cache").glob("corpus-*/train.bin")
    address = ids.data_ptr()
    mapped = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, *_, name = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in span.split("-"))
        if start <= address < end:
            mapped.append(name)
    assert mapped == [str(prepared)]


def test_a_vocabulary_above_65536_types_is_stored_as_uint32(tmp_path):
    words = [f"w{i}" for i in range(70_000)]
    folder = write_corpus(tmp_path, {"train": [" ".join(words)], "valid": ["w1 w69999"], "test": ["w2"]})
    text = load_corpus(ptb_files(folder), tmp_path / "cache")
    assert text.splits["train"].dtype == torch.uint32 and len(text.vocab) == 70_002
    assert text.vocab.decode(text.splits["valid"]) == ["w1", "w69999", EOS]


WHITESPACE = "a\x0cb  c\u2028d\x85e\n\nÉcole  naïve\r\nΣΑΣ mix\rlast line without an end"


@pytest.mark.parametrize("level", ["word", "char"])
@pytest.mark.parametrize("lowercase", [False, True])
def test_prepared_ids_equal_the_plain_tokeniser_in_pieces_and_processes(
    tmp_path, monkeypatch, level, lowercase
):
    # Pieces of 64 bytes and two processes (a file of 4 pieces or more gets one per core) must
    # give the ids of tokenising the whole text line by line: the rule that defines them.
    monkeypatch.setattr(preparation, "PIECE_BYTES", 64)
    monkeypatch.setattr(preparation.os, "sched_getaffinity", lambda pid: {0, 1})
    folder = tmp_path / "text"
    folder.mkdir()
    lines = [WHITESPACE] + [" ".join(f"w{(i * 7 + j) % 50}" for j in range(i % 9)) for i in range(300)]
    for split in ("train", "valid", "test"):
        (folder / f"ptb.{split}.txt").write_bytes("\n".join(lines).encode())
    tokenizer = Tokenizer(level, lowercase)
    assert preparation._workers(folder / "ptb.train.txt") == 2
    prepared = load_corpus(ptb_files(folder), tmp_path / "cache", tokenizer)
    tokens = read_tokens(folder / "ptb.train.txt", tokenizer)
    vocab = build_vocabulary(tokens, tokenizer)
    assert prepared.vocab.tokens == vocab.tokens
    assert prepared.splits["train"].long().tolist() == vocab.encode(tokens).tolist()
    assert prepared.eos["train"] == len(text_lines("\n".join(lines))) == len(lines) + 4  # 4 in line 1


def test_a_utf8_error_far_into_a_file_names_its_byte_and_line(tmp_path, monkeypatch):
    monkeypatch.setattr(preparation, "PIECE_BYTES", 64)
    folder = write_corpus(tmp_path, {"train": ["a b c"] * 100, "valid": ["a"], "test": ["b"]})
    with open(folder / "ptb.train.txt", "ab") as f:
        f.write("café\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"ptb.train.txt is not UTF-8: byte 803 \(line 101\) is b'\\xe9'"):
        load_corpus(ptb_files(folder), tmp_path / "cache")


def test_a_damaged_prepared_corpus_is_prepared_again(tmp_path, caplog):
    folder = write_corpus(tmp_path, {"train": ["a a b"], "valid": ["a"], "test": ["b"]})
    load_corpus(ptb_files(folder), tmp_path / "cache")
    (train,) = (tmp_path / "cache").glob("corpus-*/train.bin")
    train.write_bytes(train.read_bytes()[:3])  # as if the disk had lost its end
    assert load_corpus(ptb_files(folder), tmp_path / "cache").vocab.decode(torch.tensor([0])) == ["a"]
    assert "damaged prepared corpus" in caplog.text
    # No partial or set-aside folder is left; the lock file stays (removing it would race with a
    # process waiting on it).
    lock, prepared, record = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert prepared.startswith("corpus-") and lock == f".{prepared}.lock" and record.startswith("sources-")


def test_a_cache_folder_that_cannot_be_made_fails_before_tokenising_and_makes_nothing(tmp_path, monkeypatch):
    folder = write_corpus(tmp_path / "data", {"train": ["a b"], "valid": ["a"], "test": ["b"]})
    blocker = tmp_path / "a-file"  # a folder under a regular file stops root too, unlike chmod
    blocker.write_text("")
    forbid(monkeypatch, "_encode_splits", "tokenised before checking the cache folder")
    message = (
        f"data.cache_dir={blocker / 'cache'} cannot hold the token cache ({blocker} is a file, not a folder)"
    )
    with pytest.raises(UserError, match=re.escape(message)):
        load_corpus(ptb_files(folder), blocker / "cache")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "data"]


def test_a_full_disk_while_caching_is_one_error_and_leaves_no_file(tmp_path, monkeypatch):
    folder = write_corpus(tmp_path / "data", {"train": ["a b"], "valid": ["a"], "test": ["b"]})

    def full_disk(file, ids):
        file.write(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(preparation, "_write", full_disk)
    message = (
        f"data.cache_dir={tmp_path / 'cache'} cannot hold the token cache (No space left on device): free"
    )
    with pytest.raises(UserError, match=re.escape(message)):
        load_corpus(ptb_files(folder), tmp_path / "cache")
    (lock,) = (tmp_path / "cache").iterdir()  # neither the half-written folder nor a record
    assert lock.name.endswith(".lock")


def test_a_corpus_sent_to_another_process_maps_its_files_again(tmp_path):
    # ddp_spawn pickles the datamodule with torch's pickler, which cannot send a file-mapped storage.
    folder = write_corpus(tmp_path, {"train": ["a b c"] * 10, "valid": ["a"], "test": ["b"]})
    sent = load_corpus(ptb_files(folder), tmp_path / "cache")
    received = pickle.loads(ForkingPickler.dumps(sent))
    assert received.vocab == sent.vocab and torch.equal(received.splits["train"], sent.splits["train"])
    assert received.splits["train"].data_ptr() != sent.splits["train"].data_ptr()  # a mapping of its own
