"""`python train.py` end to end, as a user runs it: outputs, reproducibility and bad input."""

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lm.data.ptb import MD5
from tests.conftest import TINY_RUN, run_train, write_corpus
from tests.test_ptb import make_archive


def train_tiny(corpus, run_dir, *overrides):
    return run_train(
        *TINY_RUN,
        f"data.dir={corpus}",
        f"data.cache_dir={run_dir.parent / 'cache'}",
        f"hydra.run.dir={run_dir}",
        *overrides,
    )


def test_a_run_writes_metrics_tensorboard_and_checkpoints(tiny_corpus, tmp_path):
    result = train_tiny(tiny_corpus, tmp_path / "run")
    assert result.returncode == 0, result.stdout + result.stderr

    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {"val_ppl", "test_ppl", "epochs", "train_tokens_per_sec", "wall_seconds"} <= metrics.keys()
    assert metrics["epochs"] == 2 and metrics["train_tokens_per_sec"] > 0

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"val/ppl", "val/acc", "train/loss", "train/ppl", "lr", "test/ppl"} <= set(scalars)
    assert {"train/grad_norm", "throughput/train_tokens_per_sec"} <= set(scalars)
    val_ppl = [event.value for event in events.Scalars("val/ppl")]
    assert len(val_ppl) == 2 and min(val_ppl) == pytest.approx(metrics["val_ppl"], rel=1e-6)
    assert events.Scalars("test/ppl")[0].value == pytest.approx(metrics["test_ppl"], rel=1e-6)

    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert len(checkpoints) == 2 and "last.ckpt" in checkpoints
    assert metrics["best_checkpoint"].endswith(f"val_ppl{metrics['val_ppl']:.2f}.ckpt")
    assert (
        f"Restoring states from the checkpoint path at {metrics['best_checkpoint']}"
        in result.stdout + result.stderr
    )


def test_the_same_seed_gives_the_same_numbers(tiny_corpus, tmp_path):
    runs = [
        train_tiny(tiny_corpus, tmp_path / name, "seed=7", "model.net.dropout=0.3") for name in ("a", "b")
    ]
    assert all(run.returncode == 0 for run in runs), runs[0].stderr
    a, b = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("a", "b"))
    assert (a["val_ppl"], a["test_ppl"]) == (b["val_ppl"], b["test_ppl"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.url=file:///nowhere/simple-examples.tgz"], "Put ptb.train.txt, ptb.valid.txt and"),
        (["data.num_steps=100000"], "too short for one window of data.num_steps=100000"),
        (["data.batch_size=100000"], "data.batch_size=100000 streams of 0 tokens, too short"),
        (["data.batch_size=0"], "data.batch_size=0 is not allowed: it must be an integer, 1 or more."),
        (["trainer.gpus=1"], "trainer.gpus=1 asks for GPUs but PyTorch sees none"),
    ],
)
def test_bad_input_exits_with_one_clear_message(tmp_path, tiny_corpus, overrides, message):
    corpus = tmp_path / "empty" if "data.url" in overrides[0] else tiny_corpus
    result = train_tiny(corpus, tmp_path / "run", *overrides)
    assert result.returncode == 1
    assert message in result.stdout and "Traceback" not in result.stdout + result.stderr


def test_an_empty_split_exits_with_a_message_naming_it(tmp_path):
    corpus = write_corpus(tmp_path / "data", {"train": ["a b c"] * 100, "valid": [], "test": ["a b"] * 10})
    result = train_tiny(corpus, tmp_path / "run")
    assert result.returncode == 1
    assert f"The valid split in {corpus} (data.dir) holds no tokens" in result.stdout


def test_a_download_failing_its_checksum_exits_with_a_message(tmp_path):
    fake = write_corpus(tmp_path / "fake", {"train": ["a"], "valid": ["b"], "test": ["c"]})
    url = make_archive(tmp_path / "simple-examples.tgz", {s: fake / f"ptb.{s}.txt" for s in MD5})
    result = train_tiny(tmp_path / "data", tmp_path / "run", f"data.url={url}")
    assert result.returncode == 1
    assert "Downloaded ptb.train.txt" in result.stdout and "fails its MD5 check" in result.stdout
    assert not (tmp_path / "data" / "ptb.train.txt").exists()
