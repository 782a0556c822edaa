"""docs/data.md, "Large corpora": the token cache trains only on the ids it prepared for this text.

Each test damages the cache as a disk, a hand or a second process could, and checks that the next
start neither trains on the wrong ids nor names the wrong corpus in its log.
"""

import json
import logging
import multiprocessing
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from lm.data import cache_check
from lm.data import prepared as preparation
from lm.data.prepared import load_corpus
from lm.data.ptb import ptb_files
from lm.data.text import Tokenizer
from tests.conftest import write_corpus

SPLITS = {"train": ["The cat sat", "the dog the cat"], "valid": ["the cat"], "test": ["a dog"]}


def forbid_reading_ids(monkeypatch) -> None:
    def fail(path):
        raise AssertionError(f"read every id of {path}")

    monkeypatch.setattr(cache_check, "checksum", fail)


@pytest.mark.parametrize("settled", [False, True], ids=["just-prepared", "settled"])
def test_ids_overwritten_in_place_are_prepared_again(tmp_path, monkeypatch, caplog, settled):
    # Just prepared, the ids' signature is too fresh to vouch for them; settled (as after the first
    # start seconds later), the write moves their ctime. Either way they are read in full.
    if settled:
        monkeypatch.setattr(cache_check, "TIMESTAMP_SLACK_NS", 0)
    folder = write_corpus(tmp_path, SPLITS)
    prepared = load_corpus(ptb_files(folder), tmp_path / "cache")
    ids = prepared.splits["train"].tolist()
    train = prepared.folder / "train.bin"
    time.sleep(0.05)  # the write lands in a later tick of the kernel's file clock (1-10 ms)
    with open(train, "r+b") as f:
        f.write(bytes(train.stat().st_size))  # same size: every id becomes 0
    again = load_corpus(ptb_files(folder), tmp_path / "cache")
    assert again.splits["train"].tolist() == ids
    assert (
        f"Ignoring the damaged prepared corpus {prepared.folder} (train.bin changed since prepared)"
        in caplog.text
    )


@pytest.mark.parametrize("what", ["record", "folder"])
@pytest.mark.parametrize("other", ["other text", "the same text lowercased"])
def test_a_cache_naming_another_prepared_corpus_is_not_trusted(tmp_path, monkeypatch, caplog, what, other):
    # The record of our files names the other corpus's folder, or our folder holds the other
    # corpus's files: both are refused, our corpus is used, and the log names it.
    caplog.set_level(logging.INFO, logger="lm.data")
    monkeypatch.setattr(cache_check, "TIMESTAMP_SLACK_NS", 0)  # the record is trusted on its signatures
    cache = tmp_path / "cache"
    mine = write_corpus(tmp_path / "mine", SPLITS).resolve()
    right = load_corpus(ptb_files(mine), cache)
    if other == "other text":
        theirs = write_corpus(tmp_path / "theirs", {"train": ["x y z"] * 7, "valid": ["x"], "test": ["y"]})
        wrong = load_corpus(ptb_files(theirs), cache)
    else:
        wrong = load_corpus(ptb_files(mine), cache, Tokenizer(lowercase=True))
    assert wrong.vocab.tokens != right.vocab.tokens
    right_key, wrong_key = (corpus.folder.name.removeprefix("corpus-") for corpus in (right, wrong))
    if what == "record":
        (record,) = [path for path in cache.glob("sources-*.json") if right_key in path.read_text()]
        record.write_text(record.read_text().replace(right_key, wrong_key))
    else:
        shutil.rmtree(right.folder)
        shutil.copytree(wrong.folder, right.folder)

    caplog.clear()
    again = load_corpus(ptb_files(mine), cache)
    assert again.vocab.tokens == right.vocab.tokens
    assert again.splits["train"].tolist() == right.splits["train"].tolist()
    assert f"the token ids of {mine} are in {right.folder}\n" in caplog.text
    assert (
        f"Not trusting {cache / ('corpus-' + (wrong_key if what == 'record' else right_key))}" in caplog.text
    )
    # The record names our corpus again: the next start opens it without hashing the text.
    monkeypatch.setattr(preparation, "_content_key", lambda *args: pytest.fail("hashed the text again"))
    assert load_corpus(ptb_files(mine), cache).folder == right.folder


def test_bit_rot_that_leaves_the_signature_alone_is_caught_by_the_daily_full_check(
    tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(cache_check, "TIMESTAMP_SLACK_NS", 0)
    folder = write_corpus(tmp_path, SPLITS)
    prepared = load_corpus(ptb_files(folder), tmp_path / "cache")
    ids = prepared.splits["train"].tolist()
    train, verified = prepared.folder / "train.bin", prepared.folder / "verified.json"
    train.write_bytes(bytes(train.stat().st_size))
    # Rot moves no stat field: as if the last full check had seen the rotten file's signature.
    record = json.loads(verified.read_text())
    record["signatures"]["train"] = cache_check.signature(train)
    record["taken_ns"] = time.time_ns()
    verified.write_text(json.dumps(record))

    with monkeypatch.context() as within_the_day:
        forbid_reading_ids(within_the_day)
        load_corpus(ptb_files(folder), tmp_path / "cache")

    a_day_later = time.time_ns() + cache_check.FULL_CHECK_EVERY_NS
    clock = SimpleNamespace(time_ns=lambda: a_day_later, perf_counter=time.perf_counter)
    monkeypatch.setattr(cache_check, "time", clock)
    assert load_corpus(ptb_files(folder), tmp_path / "cache").splits["train"].tolist() == ids
    assert "(train.bin changed since prepared)" in caplog.text


def slow_preparation(monkeypatch, tmp_path: Path) -> Path:
    """Both processes reach the lock together (each waits at the writability check, just before it,
    for the other), and a preparation takes a second; each preparation adds a line to the file
    this returns."""
    arrived, preparations = tmp_path / "arrived", tmp_path / "preparations"
    arrived.mkdir()
    check_writable, encode_splits = cache_check.check_writable, preparation._encode_splits

    def together(cache_dir):
        (arrived / str(multiprocessing.current_process().pid)).touch()
        deadline = time.monotonic() + 60
        while len(list(arrived.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        check_writable(cache_dir)

    def slowly(*args, **kwargs):
        with open(preparations, "a") as f:
            f.write("prepared\n")
        time.sleep(1)
        return encode_splits(*args, **kwargs)

    monkeypatch.setattr(cache_check, "check_writable", together)
    monkeypatch.setattr(preparation, "_encode_splits", slowly)
    return preparations


def load_in_this_process(folder: Path, cache: Path, out: Path) -> None:
    logger = logging.getLogger("lm.data")
    logger.setLevel(logging.INFO)
    logger.addHandler(logging.FileHandler(out.with_suffix(".log")))
    out.write_text(json.dumps(load_corpus(ptb_files(folder), cache).splits["train"].tolist()))


def test_two_processes_preparing_one_corpus_prepare_it_once(tmp_path, monkeypatch):
    folder = write_corpus(tmp_path / "text", SPLITS)
    preparations = slow_preparation(monkeypatch, tmp_path)
    fork = multiprocessing.get_context("fork")  # the children keep the slow preparation above
    outs = [tmp_path / f"ids-{k}.json" for k in range(2)]
    processes = [
        fork.Process(target=load_in_this_process, args=(folder, tmp_path / "cache", out)) for out in outs
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
    assert [process.exitcode for process in processes] == [0, 0]
    assert preparations.read_text() == "prepared\n"
    assert json.loads(outs[0].read_text()) == json.loads(outs[1].read_text())
    logs = [out.with_suffix(".log").read_text() for out in outs]
    assert sorted("waiting for it" in log for log in logs) == [False, True]
