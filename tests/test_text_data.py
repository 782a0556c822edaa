"""`data=text`: any folder of train/valid/test text, its options and its errors."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lm.data.datamodule import TextDataModule
from lm.data.text import EOS, UNK, Tokenizer
from lm.data.vocabulary import Vocabulary
from lm.errors import UserError


def write_text(folder: Path, splits: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, text in splits.items():
        (folder / f"{split}.txt").write_text(text, encoding="utf-8")
    return folder


def corpus_of(folder: Path, tmp_path: Path, **options) -> TextDataModule:
    datamodule = TextDataModule(dir=str(folder), cache_dir=str(tmp_path / "cache"), **options)
    datamodule.corpus  # noqa: B018 (reads, checks and reports the splits)
    return datamodule


SPLITS = {"train": "The cat sat\nthe dog sat on the mat\n", "valid": "the cat ran\n", "test": "a Cat\n"}


def test_words_and_lines_of_any_text_folder(tmp_path):
    data = corpus_of(write_text(tmp_path / "text", SPLITS), tmp_path)
    vocab = data.vocabulary
    assert (
        vocab.decode(data.corpus.splits["train"]) == "The cat sat <eos> the dog sat on the mat <eos>".split()
    )
    assert vocab.decode(data.corpus.splits["test"]) == [UNK, UNK, EOS]  # "a" and "Cat" never seen
    assert vocab.tokens[:3] == [EOS, "sat", "the"]  # by count, ties alphabetical


def test_lowercase_min_count_and_max_vocab_make_rare_words_unk(tmp_path):
    folder = write_text(tmp_path / "text", SPLITS)
    lowered = corpus_of(folder, tmp_path, lowercase=True).vocabulary
    assert "The" not in lowered.tokens and lowered.decode(lowered.encode(["cat"])) == ["cat"]
    frequent = corpus_of(folder, tmp_path, lowercase=True, min_count=2).vocabulary
    assert frequent.tokens == ["the", EOS, "sat", UNK]  # seen 3, 2 and 2 times; <unk> added
    top = corpus_of(folder, tmp_path, lowercase=True, max_vocab=3).vocabulary
    assert top.tokens == ["the", EOS, UNK]  # the most frequent word, with the two special tokens


def test_characters_as_tokens_with_the_space_as_one(tmp_path):
    data = corpus_of(
        write_text(tmp_path / "text", {"train": "ab  ba\n", "valid": "a\n", "test": "b a\n"}),
        tmp_path,
        level="char",
    )
    assert data.vocabulary.decode(data.corpus.splits["train"]) == ["a", "b", " ", "b", "a", EOS]
    assert data.vocabulary.tokenizer.join(data.vocabulary.decode(data.corpus.splits["test"])) == "b a\n"


def test_the_options_key_the_token_cache(tmp_path):
    folder = write_text(tmp_path / "text", SPLITS)
    assert len(corpus_of(folder, tmp_path).vocabulary) != len(
        corpus_of(folder, tmp_path, lowercase=True).vocabulary
    )
    assert len(list((tmp_path / "cache").glob("corpus-*"))) == 2
    assert corpus_of(folder, tmp_path).vocabulary == corpus_of(folder, tmp_path).vocabulary  # from the cache


def test_eos_is_a_line_break_when_tokens_become_text():
    assert Tokenizer().join(["a", "b", EOS, "c", EOS]) == "a b\nc\n"
    vocab = Vocabulary.from_state_dict(Vocabulary(["x", UNK], Tokenizer("char", True)).state_dict())
    assert (vocab.tokens, vocab.tokenizer) == (["x", UNK], Tokenizer("char", True))


@pytest.mark.parametrize(
    ("splits", "options", "message"),
    [
        (
            {"train": "a\n", "valid": "a\n"},
            {},
            "has no test.txt; a corpus needs train.txt, valid.txt and test.txt",
        ),
        ({"train": "a\n", "valid": "", "test": "a\n"}, {}, "The valid split in"),
        ({"train": "a\n", "valid": "a\n", "test": "a\n"}, {"level": "byte"}, "data.level='byte'"),
        ({"train": "a\n", "valid": "a\n", "test": "a\n"}, {"min_count": 0}, "data.min_count=0"),
        ({"train": "a\n", "valid": "a\n", "test": "a\n"}, {"max_vocab": 2}, "data.max_vocab=2"),
    ],
)
def test_bad_input_is_one_clear_error(tmp_path, splits, options, message):
    folder = write_text(tmp_path / "text", splits)
    with pytest.raises(UserError, match=message):
        corpus_of(folder, tmp_path, **options)


def test_a_file_that_is_not_utf8_names_the_file_byte_and_line(tmp_path):
    folder = write_text(tmp_path / "text", {"train": "a\n", "valid": "a\n"})
    (folder / "test.txt").write_bytes("café\nnaïve\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"test.txt is not UTF-8: byte 3 \(line 1\) is b'\\xe9'"):
        corpus_of(folder, tmp_path)


def test_a_missing_folder_names_the_key(tmp_path):
    with pytest.raises(UserError, match=r"data.dir=.*nowhere is not a folder"):
        corpus_of(tmp_path / "nowhere", tmp_path)


def test_text_splits_read_like_ptb(tmp_path):
    data = corpus_of(
        write_text(tmp_path / "text", {s: "x y z\n" * 50 for s in ("train", "valid", "test")}),
        tmp_path,
        batch_size=2,
        num_steps=5,
    )
    data.setup("fit")
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (2, 5) and torch.equal(x[:, 1:], y[:, :-1])


def test_each_rank_reads_its_own_rows_of_the_mapped_ids_without_a_copy(tmp_path):
    data = TextDataModule(
        dir=str(write_text(tmp_path / "text", {s: "x y z\n" * 50 for s in ("train", "valid", "test")})),
        cache_dir=str(tmp_path / "cache"),
        batch_size=4,
        eval_batch_size=4,
        num_steps=5,
    )
    data.trainer = SimpleNamespace(global_rank=1, world_size=2)
    data.setup("fit")
    ids, streams = data.corpus.splits["train"], data.streams["train"]
    per_stream = len(ids) // 4
    assert streams.shape == (2, per_stream) and streams.dtype == torch.uint16
    # Rank 1 owns rows 2 and 3: a view that starts where they start in the mapped file.
    assert streams.data_ptr() == ids.data_ptr() + 2 * per_stream * ids.element_size()
    x, y = next(iter(data.train_dataloader()))
    assert x.dtype == torch.long and x.tolist() == streams[:, :5].long().tolist()
