"""docs/design.md, "Data" and "Many devices": streams, windows and the split by rank."""

from itertools import pairwise
from types import SimpleNamespace

import pytest
import torch

from lm.data.datamodule import PTBDataModule
from lm.data.windows import WindowDataset, batchify
from lm.errors import UserError
from tests.conftest import write_corpus


def test_batchify_makes_contiguous_rows():
    streams = batchify(torch.arange(23), 4)
    assert streams.shape == (4, 5)  # 23 // 4 tokens per stream, the remainder dropped
    assert streams[1].tolist() == [5, 6, 7, 8, 9]


@pytest.mark.parametrize("full_windows_only", [True, False])
def test_windows_are_shifted_by_one_and_continue_each_other(full_windows_only):
    streams = batchify(torch.arange(3 * 47), 3)  # 47 tokens per stream, 46 targets
    windows = list(WindowDataset(streams, 10, full_windows_only))
    assert len(windows) == (4 if full_windows_only else 5)  # (47 - 1) // 10 full, one short
    for x, y in windows:
        assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    for (_, y), (x_next, _) in pairwise(windows):
        assert torch.equal(x_next[:, 0], y[:, -1])  # every row goes on where it stopped


def test_evaluation_windows_score_every_target_exactly_once():
    streams = batchify(torch.arange(2 * 53), 2)
    targets = torch.cat([y for _, y in WindowDataset(streams, 7, full_windows_only=False)], dim=1)
    assert torch.equal(targets, streams[:, 1:])


def datamodule(folder, tmp_path, world_size=1, rank=0, **sizes):
    module = PTBDataModule(dir=folder, cache_dir=tmp_path / "cache", url="file:///nowhere", **sizes)
    module.trainer = SimpleNamespace(global_rank=rank, world_size=world_size) if world_size > 1 else None
    module.setup("fit")
    return module


def test_each_rank_reads_its_own_contiguous_rows_of_the_global_batch(tiny_corpus, tmp_path):
    single = datamodule(tiny_corpus, tmp_path, batch_size=4, eval_batch_size=4)
    ranks = [datamodule(tiny_corpus, tmp_path, 2, rank, batch_size=4, eval_batch_size=4) for rank in (0, 1)]
    for split in ("train", "valid"):
        assert torch.equal(torch.cat([r.streams[split] for r in ranks]), single.streams[split])
    assert all(torch.equal(r.streams["test"], single.streams["test"]) for r in ranks)  # batch 1, whole
    first_windows = [next(iter(r.train_dataloader())) for r in ranks]
    x, _ = next(iter(single.train_dataloader()))
    assert torch.equal(torch.cat([w[0] for w in first_windows]), x)


def test_loaders_use_the_configured_sizes(tiny_corpus, tmp_path):
    sizes = {"batch_size": 4, "num_steps": 10, "eval_batch_size": 2, "test_num_steps": 50}
    module = datamodule(tiny_corpus, tmp_path, **sizes)
    assert next(iter(module.train_dataloader()))[0].shape == (4, 10)
    assert next(iter(module.val_dataloader()))[0].shape == (2, 10)
    assert next(iter(module.test_dataloader()))[0].shape == (1, 50)
    assert module.vocab_size == 12  # ten words, <eos> and <unk>


def test_batch_size_must_divide_by_the_processes(tiny_corpus, tmp_path):
    with pytest.raises(UserError, match=r"data.batch_size=5 streams do not divide among 2 processes"):
        datamodule(tiny_corpus, tmp_path, 2, 0, batch_size=5)


def test_windows_too_long_for_a_split_are_an_error(tiny_corpus, tmp_path):
    with pytest.raises(UserError, match=r"train split .* data.num_steps=5000"):
        datamodule(tiny_corpus, tmp_path, batch_size=4, num_steps=5000)


def test_an_empty_split_is_an_error(tmp_path):
    folder = write_corpus(tmp_path / "data", {"train": ["a b c"] * 50, "valid": ["a b"], "test": []})
    with pytest.raises(UserError, match=r"test split in .* holds no tokens"):
        datamodule(folder, tmp_path)
