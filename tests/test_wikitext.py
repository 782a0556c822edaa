"""WikiText is found, or downloaded, extracted and verified; nothing the user had is overwritten."""

import dataclasses
import json
import logging
import random
import socket
import subprocess
import sys
import time
import tracemalloc
import urllib.request
import zipfile
from pathlib import Path

import pytest
import torch

from lm.data.text import Tokenizer
from lm.data.wikitext import DATASETS, check_published_counts, count_tokens, ensure_wikitext, wikitext_files
from lm.errors import UserError
from lm.training.trainer import trainer_arguments
from tests.conftest import compose_config, read_tokens, run_train

SPLITS = ("train", "valid", "test")
NAMES = ["wiki.test.tokens", "wiki.train.tokens", "wiki.valid.tokens"]


def wikitext_text(articles: int, seed: int) -> str:
    """Articles in WikiText's layout: a space before and after every line, blank lines around the
    headings, `@-@` and `@,@` inside words and numbers, `<unk>` for rare words."""
    rng = random.Random(seed)
    words = "the valkyria of chronicles game <unk> , . 1 @,@ 000 @-@ team battle war ( ) is a".split()

    def sentence() -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(4, 20)))

    lines = []
    for article in range(articles):
        lines += [" ", f" = Title {article} = ", " "]
        for section in range(rng.randint(1, 3)):
            lines += [
                f" {sentence()} ",
                " ",
                f" = = Section {section} = = ",
                " ",
                f" {sentence()} {sentence()} ",
            ]
            lines += [" ", " = = = Sub @-@ section = = = ", " ", f" {sentence()} "]
        lines.append(" ")
    return "".join(f"{line}\n" for line in lines)


def write_wikitext(folder: Path) -> dict[str, Path]:
    """wiki.{train,valid,test}.tokens of a small synthetic corpus."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, (articles, seed) in {"train": (30, 0), "valid": (5, 1), "test": (5, 2)}.items():
        (folder / f"wiki.{split}.tokens").write_text(wikitext_text(articles, seed))
    return wikitext_files(folder)


def make_zip(path: Path, files: dict[str, Path], folder: str = "wikitext-2/") -> Path:
    """A zip with the official layout: wikitext-2/ and its wiki.<split>.tokens."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(folder, "")
        for split, source in files.items():
            zf.write(source, f"{folder}wiki.{split}.tokens")
    return path


@pytest.fixture
def corpus(tmp_path) -> dict[str, Path]:
    return write_wikitext(tmp_path / "source")


@pytest.fixture
def published(monkeypatch, corpus):
    """The published counts replaced by the synthetic corpus's own, so that it passes as WikiText-2
    (the real files are 13 MB and 540 MB; the rule counted by is the same)."""
    tokens = {split: len(read_tokens(path)) for split, path in corpus.items()}
    types = len(set(read_tokens(corpus["train"])))
    monkeypatch.setitem(
        DATASETS, "wikitext2", dataclasses.replace(DATASETS["wikitext2"], tokens=tokens, types=types)
    )
    return tokens


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`python -m http.server` on a free local port, serving a folder: (folder, base URL)."""
    root = tmp_path_factory.mktemp("served")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port), "--directory", str(root)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                urllib.request.urlopen(base + "/", timeout=1).close()
                break
            except OSError:
                assert process.poll() is None, "http.server exited at start-up"
                assert time.monotonic() < deadline, "http.server did not answer within 10 s"
                time.sleep(0.05)
        yield root, base
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def serve(server, name: str, files: dict[str, Path]) -> str:
    root, base = server
    make_zip(root / name, files)
    return f"{base}/{name}"


def test_download_extracts_and_verifies_the_three_files(server, corpus, published, tmp_path):
    url = serve(server, "full.zip", corpus)
    data = tmp_path / "data"
    files = ensure_wikitext(data, "wikitext2", url)
    assert files == {split: data / f"wiki.{split}.tokens" for split in SPLITS}
    assert {split: path.read_bytes() for split, path in files.items()} == {
        split: path.read_bytes() for split, path in corpus.items()
    }
    assert sorted(path.name for path in data.iterdir()) == NAMES  # the temporary folder is gone


def test_only_missing_files_are_downloaded(server, corpus, published, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "wiki.train.tokens").write_bytes(b" my own train text \r\n")
    # The served zip has no train file: asking for it would be an error.
    url = serve(server, "no-train.zip", {"valid": corpus["valid"], "test": corpus["test"]})
    files = ensure_wikitext(data, "wikitext2", url)
    assert files["train"].read_bytes() == b" my own train text \r\n"
    assert files["valid"].read_bytes() == corpus["valid"].read_bytes()
    assert files["test"].read_bytes() == corpus["test"].read_bytes()
    assert sorted(path.name for path in data.iterdir()) == NAMES


def test_files_present_are_returned_without_a_download(tmp_path):
    files = write_wikitext(tmp_path / "data")
    before = {split: path.read_bytes() for split, path in files.items()}
    # Neither the URL nor the counts are looked at: the data module checks the counts after reading.
    assert ensure_wikitext(tmp_path / "data", "wikitext2", "file:///never/fetched.zip") == files
    assert {split: path.read_bytes() for split, path in files.items()} == before


def test_a_download_differing_from_the_published_counts_is_an_error_and_not_kept(server, corpus, tmp_path):
    url = serve(server, "small.zip", corpus)  # the real published counts: the synthetic corpus is far smaller
    data = tmp_path / "data"
    with pytest.raises(UserError) as error:
        ensure_wikitext(data, "wikitext2", url)
    message = str(error.value)
    train = len(read_tokens(corpus["train"]))
    assert message.startswith("wiki.train.tokens downloaded from data.url=" + url)
    assert f"has {train} tokens (with <eos>), the published one 2088628" in message
    assert "not kept" in message and f"data.dir={data}" in message
    assert list(data.iterdir()) == []


def test_one_wrong_split_keeps_none_of_them(server, corpus, published, monkeypatch, tmp_path):
    tokens = {**published, "test": published["test"] + 1}
    monkeypatch.setitem(DATASETS, "wikitext2", dataclasses.replace(DATASETS["wikitext2"], tokens=tokens))
    url = serve(server, "full.zip", corpus)
    with pytest.raises(UserError, match=r"^wiki\.test\.tokens downloaded .* not kept"):
        ensure_wikitext(tmp_path / "data", "wikitext2", url)
    assert list((tmp_path / "data").iterdir()) == []  # train and valid passed, and were not kept either


def test_a_truncated_zip_is_one_clear_error_and_nothing_is_kept(server, corpus, published, tmp_path):
    root, base = server
    whole = make_zip(tmp_path / "whole.zip", corpus).read_bytes()
    (root / "truncated.zip").write_bytes(whole[: len(whole) // 2])
    url = f"{base}/truncated.zip"
    data = tmp_path / "data"
    with pytest.raises(UserError) as error:
        ensure_wikitext(data, "wikitext2", url)
    message = str(error.value)
    assert message.startswith(f"The download from data.url={url} is not a complete WikiText-2 zip (")
    assert f"nothing was kept in data.dir={data}. Retry, or put wiki.train.tokens" in message
    assert list(data.iterdir()) == []


def test_a_crc_error_is_the_same_clear_error(corpus, published, tmp_path):
    archive = tmp_path / "stored.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        for split, path in corpus.items():
            zf.write(path, f"wikitext-2/wiki.{split}.tokens")
    raw = bytearray(archive.read_bytes())
    at = raw.index(b"= Title 0 =")  # inside the first member's stored bytes
    raw[at] = ord("#")
    archive.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"is not a complete WikiText-2 zip \(Bad CRC-32 .* nothing was kept"):
        ensure_wikitext(tmp_path / "data", "wikitext2", archive.as_uri())  # a file:// URL works too
    assert list((tmp_path / "data").iterdir()) == []


def test_a_zip_without_a_needed_member_names_it(corpus, published, tmp_path):
    archive = make_zip(tmp_path / "part.zip", {"train": corpus["train"], "test": corpus["test"]})
    with pytest.raises(
        UserError, match=r"not a complete WikiText-2 zip \(it has no wikitext-2/wiki\.valid\.tokens\)"
    ):
        ensure_wikitext(tmp_path / "data", "wikitext2", archive.as_uri())
    assert list((tmp_path / "data").iterdir()) == []


def test_paths_in_the_zip_are_not_trusted(corpus, published, tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for split, path in corpus.items():
            zf.write(path, f"../../escape/wiki.{split}.tokens")
    data = tmp_path / "deep" / "data"
    files = ensure_wikitext(data, "wikitext2", archive.as_uri())
    assert files["train"].read_bytes() == corpus["train"].read_bytes()
    assert sorted(path.name for path in data.iterdir()) == NAMES
    assert not (tmp_path / "escape").exists() and not (tmp_path / "deep" / "escape").exists()


def test_a_full_disk_while_extracting_is_a_clear_error(corpus, published, monkeypatch, tmp_path):
    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    archive = make_zip(tmp_path / "full.zip", corpus)
    monkeypatch.setattr(zipfile.ZipFile, "open", no_space)
    with pytest.raises(UserError, match=r"\(No space left on device\); nothing was kept\. Free some space"):
        ensure_wikitext(tmp_path / "data", "wikitext2", archive.as_uri())
    assert list((tmp_path / "data").iterdir()) == []


def test_the_official_folder_wins_over_another_copy_in_the_zip(corpus, published, tmp_path):
    archive = tmp_path / "decoy.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("wikitext-2-raw/copy/wiki.train.tokens", " decoy \n")  # first in the archive
        for split, path in corpus.items():
            zf.write(path, f"wikitext-2/wiki.{split}.tokens")
    files = ensure_wikitext(tmp_path / "data", "wikitext2", archive.as_uri())
    assert files["train"].read_bytes() == corpus["train"].read_bytes()


def test_a_url_that_404s_names_the_url_and_data_dir(server, tmp_path):
    url = f"{server[1]}/absent.zip"
    data = tmp_path / "data"
    with pytest.raises(UserError) as error:
        ensure_wikitext(data, "wikitext2", url)
    message = str(error.value)
    assert f"data.url={url} failed (HTTP Error 404" in message
    assert f"data.dir={data}" in message and "wiki.valid.tokens" in message
    assert list(data.iterdir()) == []


def test_an_unknown_name_lists_the_known_ones(tmp_path):
    with pytest.raises(
        UserError,
        match=r"^data\.name='wikitext3' is not a WikiText dataset; use one of wikitext2, wikitext103\.$",
    ):
        ensure_wikitext(tmp_path, "wikitext3", "file:///never.zip")


REAL = DATASETS["wikitext2"]
WORDS = Tokenizer()


def check(caplog, tokens=REAL.tokens, types=REAL.types, tokenizer=WORDS, min_count=1, max_vocab=None):
    files = wikitext_files(Path("/data/wt2"))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lm.data.wikitext"):
        check_published_counts("wikitext2", files, dict(tokens), types, tokenizer, min_count, max_vocab)
    return [record.getMessage() for record in caplog.records]


def test_published_counts_say_nothing(caplog):
    assert check(caplog) == []


def test_a_differing_split_is_a_warning_naming_the_file(caplog):
    messages = check(caplog, tokens={**REAL.tokens, "valid": 217_645})
    assert messages == [
        "/data/wt2/wiki.valid.tokens has 217645 tokens (with <eos>), not the published 217646 of WikiText-2; "
        "its perplexities are not comparable with the published ones."
    ]
    assert all(record.levelno == logging.WARNING for record in caplog.records)


def test_types_are_compared_only_with_the_published_vocabulary_options(caplog):
    assert check(caplog, types=33_277) == [
        "The vocabulary of /data/wt2/wiki.train.tokens has 33277 types, not the published 33278 of "
        "WikiText-2; perplexities are not comparable with the published ones."
    ]
    assert check(caplog, types=20_000, min_count=2) == []
    assert check(caplog, types=20_000, max_vocab=20_000) == []
    assert check(caplog, types=30_000, tokenizer=Tokenizer(lowercase=True)) == []
    # Lowercasing changes no token count, so those are still compared.
    assert len(check(caplog, tokens={**REAL.tokens, "test": 1}, tokenizer=Tokenizer(lowercase=True))) == 1


def test_characters_are_not_checked(caplog):
    assert (
        check(caplog, tokens={"train": 1, "valid": 2, "test": 3}, types=50, tokenizer=Tokenizer("char")) == []
    )


def test_the_data_module_reads_the_download_with_the_published_counts(
    server, corpus, published, tmp_path, caplog
):
    from lm.data.datamodule import WikiTextDataModule

    url = serve(server, "full.zip", corpus)
    module = WikiTextDataModule(str(tmp_path / "data"), str(tmp_path / "cache"), name="wikitext2", url=url)
    with caplog.at_level(logging.WARNING):
        sizes = {split: len(ids) for split, ids in module.corpus.splits.items()}
    assert sizes == published
    assert module.vocab_size == DATASETS["wikitext2"].types
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] == []


TRICKY = [
    b"",
    b"\n",
    b" \n \n",
    b" = Title = \n \n no final newline",
    b" a b \r\n c @-@ d \r\n\r\n <unk> e \r\n",
    b"lone\rcarriage\r\rreturns\r",
    b"mixed\r\n\n\rends\r\n",
    # Form feed, NEL, no-break and line separators: words break there, lines do not (as in text_lines).
    " a\x0cb c\u0085d e\u00a0f\u2028g \u3000 h\x1ci \n".encode(),
    " caf\u00e9 na\u00efve \u65e5\u672c \u00e9\u00e9\u00e9 \r\n\u00e9".encode(),
]


@pytest.mark.parametrize("data", TRICKY)
@pytest.mark.parametrize("piece_bytes", [1, 2, 3, 7, 1 << 20])
def test_token_counting_is_read_tokens(data, piece_bytes, tmp_path):
    path = tmp_path / "wiki.tokens"
    path.write_bytes(data)
    assert count_tokens(path, piece_bytes) == len(read_tokens(path))


@pytest.mark.parametrize("piece_bytes", [5, 64, 1 << 20])
def test_token_counting_of_the_synthetic_corpus(corpus, piece_bytes, tmp_path):
    text = corpus["train"].read_bytes()
    variants = {
        "as is": text,
        "no final newline": text.rstrip(b"\n"),
        "crlf": text.replace(b"\n", b"\r\n"),
        "crlf without the last": text.replace(b"\n", b"\r\n")[:-2],
    }
    for name, data in variants.items():
        path = tmp_path / f"{name}.tokens"
        path.write_bytes(data)
        assert count_tokens(path, piece_bytes) == len(read_tokens(path)), name
    assert count_tokens(corpus["train"]) > 4000  # a real test: thousands of tokens, blank lines included


def test_token_counting_needs_little_memory(tmp_path):
    path = tmp_path / "big.tokens"
    path.write_text(wikitext_text(1, 0) * 8000)  # about 4 MB
    tracemalloc.start()
    try:
        count_tokens(path, piece_bytes=1 << 14)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert path.stat().st_size > 3_000_000 and peak < 500_000


def test_the_configs_compose(monkeypatch):
    monkeypatch.delenv("WIKITEXT2_DIR", raising=False)
    monkeypatch.delenv("WIKITEXT103_DIR", raising=False)
    for name in ("wikitext2", "wikitext103"):
        cfg = compose_config(f"data={name}")
        assert cfg.data._target_ == "lm.data.datamodule.WikiTextDataModule"
        assert cfg.data.name == name
        assert cfg.data.url == DATASETS[name].url
        assert cfg.data.dir.endswith("/data/wikitext-2" if name == "wikitext2" else "/data/wikitext-103")
        assert (cfg.data.level, cfg.data.lowercase, cfg.data.min_count, cfg.data.max_vocab) == (
            "word",
            False,
            1,
            None,
        )


@pytest.mark.parametrize(
    ("data", "preset", "expected"),
    [
        # batch, window, layers, hidden, embedding, hidden dropout, input dropout, epochs, clip, seed
        ("wikitext2", "awd_wt2", (80, 70, 3, 1150, 400, 0.2, 0.65, 750, 0.25, 1882)),
        ("wikitext103", "lstm_wt103", (20, 30, 1, 1024, None, 0.0, 0.0, 6, 5, 1)),
    ],
)
def test_the_wikitext_presets_compose_with_a_gpu(data, preset, expected, monkeypatch):
    cfg = compose_config(f"data={data}", f"model={preset}", "trainer.gpus=1")
    model = cfg.model
    found = (cfg.data.batch_size, cfg.data.num_steps, model.net.num_layers, model.net.hidden_size)
    found += (model.net.embedding_size, model.net.hidden_dropout, model.net.input_dropout)
    assert found + (cfg.trainer.max_epochs, cfg.trainer.gradient_clip_val, cfg.seed) == expected
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert trainer_arguments(cfg.trainer)["accelerator"] == "gpu"


def many_types(count: int) -> str:
    """One line of `count` distinct words: a vocabulary above the WikiText-103 preset's cutoffs."""
    return " " + " ".join(f"w{i}" for i in range(count)) + " \n"


@pytest.mark.slow
@pytest.mark.parametrize(("data", "preset"), [("wikitext2", "awd_wt2"), ("wikitext103", "lstm_wt103")])
def test_the_wikitext_presets_start_on_a_corpus_of_that_layout(data, preset, tmp_path):
    # The full-size networks, one training step, one validation and one test window, on the CPU.
    folder = tmp_path / data
    write_wikitext(folder)
    train = folder / "wiki.train.tokens"
    train.write_text(train.read_text() * 4 + (many_types(70_000) if data == "wikitext103" else ""))
    result = run_train(
        f"data={data}",
        f"model={preset}",
        f"data.dir={folder}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        "trainer.max_steps=1",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "trainer.enable_progress_bar=false",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["test_ppl"] > 1
    assert "not the published" in result.stdout  # a synthetic corpus is not WikiText: the log says so
