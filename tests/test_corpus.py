"""design.md, "Data": tokens, vocabulary and the token cache."""

import errno
import os
import re

import pytest
import torch

from lm import corpus
from lm.corpus import EOS, UNK, Vocabulary, load_corpus
from lm.errors import UserError
from lm.ptb import ptb_files
from tests.conftest import write_corpus


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
    vocab = Vocabulary.build("b a c a b d".split())
    assert vocab.tokens == ["a", "b", "c", "d", UNK]  # counts 2, 2, 1, 1, and <unk> unseen
    assert Vocabulary.build("d c b a b a".split()).tokens == vocab.tokens
    assert vocab.encode("a d zebra".split()).tolist() == [0, 3, 4]
    assert vocab.decode(torch.tensor([1, 2])) == ["b", "c"]


def test_lines_end_with_eos_and_unseen_words_become_unk(tmp_path):
    folder = write_corpus(tmp_path, {"train": ["x y", "y"], "valid": ["y z"], "test": ["x"]})
    text = load_corpus(ptb_files(folder), tmp_path / "cache")
    assert text.vocab.decode(text.splits["train"]) == ["x", "y", EOS, "y", EOS]
    assert text.vocab.decode(text.splits["valid"]) == ["y", UNK, EOS]
    assert text.unknown_counts() == {"train": 0, "valid": 1, "test": 0}


def test_second_load_comes_from_the_cache_and_edits_invalidate_it(tmp_path, monkeypatch):
    folder = write_corpus(tmp_path, {"train": ["a b c"], "valid": ["a"], "test": ["b"]})
    first = load_corpus(ptb_files(folder), tmp_path / "cache")

    def no_tokenising(path):
        raise AssertionError(f"re-tokenised {path}")

    monkeypatch.setattr(corpus, "read_tokens", no_tokenising)
    cached = load_corpus(ptb_files(folder), tmp_path / "cache")
    assert cached.vocab.tokens == first.vocab.tokens
    assert all(torch.equal(cached.splits[k], first.splits[k]) for k in first.splits)

    monkeypatch.undo()
    write_corpus(folder, {"train": ["a b c d"]})
    assert "d" in load_corpus(ptb_files(folder), tmp_path / "cache").vocab.tokens


def test_a_damaged_cache_is_rebuilt(tmp_path):
    folder = write_corpus(tmp_path, {"train": ["a a b"], "valid": ["a"], "test": ["b"]})
    load_corpus(ptb_files(folder), tmp_path / "cache")
    (cache_file,) = (tmp_path / "cache").iterdir()
    cache_file.write_bytes(cache_file.read_bytes()[:20])  # as if the writer had been killed
    assert load_corpus(ptb_files(folder), tmp_path / "cache").vocab.decode(torch.tensor([0])) == ["a"]
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".pt"]  # no temporary files left


def test_a_cache_folder_that_cannot_be_made_fails_before_tokenising_and_makes_nothing(tmp_path, monkeypatch):
    folder = write_corpus(tmp_path / "data", {"train": ["a b"], "valid": ["a"], "test": ["b"]})
    blocker = tmp_path / "a-file"  # a folder under a regular file stops root too, unlike chmod
    blocker.write_text("")

    def no_tokenising(path):
        raise AssertionError(f"tokenised {path} before checking the cache folder")

    monkeypatch.setattr(corpus, "read_tokens", no_tokenising)
    message = (
        f"data.cache_dir={blocker / 'cache'} cannot hold the token cache ({blocker} is a file, not a folder)"
    )
    with pytest.raises(UserError, match=re.escape(message)):
        load_corpus(ptb_files(folder), blocker / "cache")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "data"]


def test_a_full_disk_while_caching_is_one_error_and_leaves_no_file(tmp_path, monkeypatch):
    folder = write_corpus(tmp_path / "data", {"train": ["a b"], "valid": ["a"], "test": ["b"]})

    def full_disk(obj, file):
        file.write(b"half a cache")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    message = (
        f"data.cache_dir={tmp_path / 'cache'} cannot hold the token cache (No space left on device): free"
    )
    with pytest.raises(UserError, match=re.escape(message)):
        load_corpus(ptb_files(folder), tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # neither the temporary file nor a cache
