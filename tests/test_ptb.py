"""PTB is found, or downloaded and verified; nothing the user had is overwritten."""

import logging
import tarfile
from pathlib import Path

import pytest

from lm.errors import UserError
from lm.ptb import MD5, _md5, ensure_ptb
from tests.conftest import write_corpus


def make_archive(path: Path, files: dict[str, Path]) -> str:
    """A simple-examples.tgz with Mikolov's layout; returns its file:// URL."""
    with tarfile.open(path, "w:gz") as tar:
        tar.add(path.parent, arcname="./simple-examples", recursive=False)
        for split, source in files.items():
            tar.add(source, arcname=f"./simple-examples/data/ptb.{split}.txt")
    return path.as_uri()


def test_download_extracts_and_verifies_the_three_files(ptb_dir, tmp_path):
    url = make_archive(tmp_path / "simple-examples.tgz", {s: ptb_dir / f"ptb.{s}.txt" for s in MD5})
    files = ensure_ptb(tmp_path / "data", url)
    assert {split: _md5(path) for split, path in files.items()} == MD5
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [
        "ptb.test.txt",
        "ptb.train.txt",
        "ptb.valid.txt",
    ]


def test_a_download_failing_its_checksum_is_an_error_and_not_kept(tmp_path):
    fake = write_corpus(tmp_path / "fake", {"train": ["a"], "valid": ["b"], "test": ["c"]})
    url = make_archive(tmp_path / "simple-examples.tgz", {s: fake / f"ptb.{s}.txt" for s in MD5})
    with pytest.raises(UserError, match="fails its MD5 check"):
        ensure_ptb(tmp_path / "data", url)
    assert list((tmp_path / "data").iterdir()) == []


def test_an_impossible_download_says_where_to_put_the_files(tmp_path):
    with pytest.raises(UserError) as error:
        ensure_ptb(tmp_path / "data", (tmp_path / "missing.tgz").as_uri())
    message = str(error.value)
    assert str(tmp_path / "data") in message and "data.dir" in message and "PTB_DIR" in message


def test_only_missing_files_are_downloaded(ptb_dir, tmp_path):
    user = write_corpus(tmp_path / "data", {"train": ["my own train text"]})
    before = (user / "ptb.train.txt").read_text()
    url = make_archive(tmp_path / "simple-examples.tgz", {s: ptb_dir / f"ptb.{s}.txt" for s in MD5})
    ensure_ptb(user, url)
    assert (user / "ptb.train.txt").read_text() == before
    assert _md5(user / "ptb.valid.txt") == MD5["valid"]


def test_local_variants_are_used_with_a_warning_naming_each_file(tmp_path, caplog):
    folder = write_corpus(tmp_path, {"train": ["a"], "valid": ["b"], "test": ["c"]})
    with caplog.at_level(logging.WARNING):
        files = ensure_ptb(folder, url="file:///never/fetched.tgz")
    assert files["train"] == folder / "ptb.train.txt"
    for split in MD5:
        assert any(f"ptb.{split}.txt differs" in record.message for record in caplog.records)
