"""Resuming exactly, preemption, divergence, other runs' folders and bad configuration."""

import json
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lm.data.datamodule import PTBDataModule
from lm.errors import UserError
from lm.training.run_folder import prepare_run_folder
from lm.training.safe_stop import TrainingCheckpoint
from tests.conftest import (
    TINY_RUN,
    language_model,
    quiet_trainer,
    run_script,
    run_train,
    write_corpus,
    write_tiny_corpus,
)

# Dropout on, so that only a restored random state can give the same numbers.
EXACT = [*TINY_RUN, "model.net.dropout=0.3", "trainer.log_every_n_steps=1"]
STEPS = 105  # training steps in an epoch of the corpus below (8 streams of 20-token windows)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[str]:
    """A corpus of STEPS windows an epoch: longer than a short run of max_steps=30."""
    root = tmp_path_factory.mktemp("reliability")
    folder = write_tiny_corpus(root / "data", train_lines=2000)
    data = PTBDataModule(
        dir=folder, cache_dir=root / "cache", url="file:///nowhere", batch_size=8, num_steps=20
    )
    data.setup("fit")
    assert len(data.train_dataloader()) == STEPS
    return [f"data.dir={folder}", f"data.cache_dir={root / 'cache'}"]


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = run_train(*EXACT, *corpus, f"hydra.run.dir={run}")
    assert result.returncode == 0, result.stdout + result.stderr
    return run


def epoch_curves(run: Path) -> dict[str, list[float]]:
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return {tag: [event.value for event in events.Scalars(tag)] for tag in ("val/ppl", "train/epoch_ppl")}


def parameters(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]


def assert_same_run(run: Path, reference: Path) -> None:
    assert epoch_curves(run) == epoch_curves(reference)  # every epoch, into the same TensorBoard run
    metrics, expected = (json.loads((r / "metrics.json").read_text()) for r in (run, reference))
    assert (metrics["val_ppl"], metrics["test_ppl"], metrics["epochs"]) == (
        expected["val_ppl"],
        expected["test_ppl"],
        expected["epochs"],
    )
    final, reference_final = (
        parameters(run / "checkpoints/last.ckpt"),
        parameters(reference / "checkpoints/last.ckpt"),
    )
    assert all(torch.equal(final[name], reference_final[name]) for name in reference_final)


def test_resuming_at_an_epoch_boundary_reproduces_the_run(corpus, uninterrupted, tmp_path):
    first = run_train(*EXACT, *corpus, "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'run'}")
    assert first.returncode == 0, first.stdout + first.stderr
    resumed = run_train(*EXACT, *corpus, f"resume={tmp_path / 'run'}")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming from {tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}" in resumed.stdout
    assert_same_run(tmp_path / "run", uninterrupted)
    assert (tmp_path / "run" / ".hydra" / "overrides.yaml").read_text().count("max_epochs=1") == 1  # kept
    assert len(list((tmp_path / "run" / ".hydra").glob("resumed-*/config.yaml"))) == 1


def test_resuming_with_another_configuration_is_refused(corpus, uninterrupted):
    result = run_train(*EXACT, *corpus, "model.net.dropout=0.5", f"resume={uninterrupted}")
    assert result.returncode == 1
    assert "model.net.dropout=0.3 then, 0.5 now" in result.stdout


def test_resuming_with_fewer_epochs_is_refused(corpus, uninterrupted):
    result = run_train(*EXACT, *corpus, "trainer.max_epochs=1", f"resume={uninterrupted}")
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr
    assert "resume: trainer.max_epochs=1 is fewer than the run's 2: a resumed run may train" in result.stdout


def test_a_run_folder_with_checkpoints_is_not_overwritten_unless_asked(corpus, uninterrupted, tmp_path):
    run = tmp_path / "run"
    first = run_train(*TINY_RUN, *corpus, "trainer.max_epochs=1", f"hydra.run.dir={run}")
    assert first.returncode == 0, first.stdout + first.stderr
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}

    again = run_train(*TINY_RUN, *corpus, "trainer.max_epochs=1", f"hydra.run.dir={run}")
    assert again.returncode == 1
    assert (
        f"{run} already holds the checkpoints of an earlier run. Resume it with resume={run}" in again.stdout
    )
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == before

    replaced = run_train(
        *TINY_RUN, *corpus, "trainer.max_epochs=1", "seed=2", "overwrite=true", f"hydra.run.dir={run}"
    )
    assert replaced.returncode == 0, replaced.stdout + replaced.stderr
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} != before


def test_a_diverging_run_stops_at_the_first_bad_step_and_keeps_the_last_good_checkpoint(corpus, tmp_path):
    # lr multiplied by 3e38 from the second epoch: the first step there overflows the weights.
    run = tmp_path / "run"
    result = run_train(
        *TINY_RUN, *corpus, "model.lr_decay=3e38", "model.decay_after=1", f"hydra.run.dir={run}"
    )
    assert result.returncode == 1
    message = f"the training loss is not finite at step {STEPS + 1} (epoch 2, lr 3e+38)"
    assert (
        f"Training diverged: {message}. The last good checkpoint is {run / 'checkpoints/last.ckpt'}"
        in result.stdout
    )
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["status"], metrics["step"], metrics["error"]) == ("diverged", STEPS + 1, message)
    good = parameters(run / "checkpoints/last.ckpt")
    assert all(torch.isfinite(tensor).all() for tensor in good.values())


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.net.dropout=1.0", "model.net.dropout=1.0 is not allowed: it must be a number in [0, 1)."),
        (
            "model.net.hidden_size=0",
            "model.net.hidden_size=0 is not allowed: it must be an integer, 1 or more.",
        ),
        ("model.lr=-1", "model.lr=-1 is not allowed: it must be a number, 0 or more."),
        (
            "model.net.num_layers=two",
            "model.net.num_layers='two' is not allowed: it must be an integer, 1 or more.",
        ),
        (
            "model=huge",
            "Available options in 'model':\n\tawd\n\tawd_cpu\n\tawd_wt2\n\tlarge\n\tlstm_wt103\n\tmedium"
            "\n\tmogrifier\n\tmogrifier_cpu\n\tsmall\n\txlstm\n\txlstm_cpu",
        ),
        (
            "model.net.weight_drop=0.5x",
            "model.net.weight_drop='0.5x' is not allowed: it must be a number in [0, 1).",
        ),
        ("model.hiden_size=3", "Could not override 'model.hiden_size'"),
        (
            "resume=/nonexistent/run",
            "resume=/nonexistent/run: no /nonexistent/run in a run's checkpoints/ folder",
        ),
    ],
)
def test_a_bad_configuration_fails_before_any_work_naming_the_key(override, message, tmp_path):
    result = run_train(override, f"hydra.run.dir={tmp_path / 'run'}", "data.dir=/nonexistent")
    assert result.returncode == 1
    assert message in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_of_two_runs_started_in_one_folder_the_second_stops(tmp_path):
    cfg = OmegaConf.create({"resume": None, "overwrite": False, "continue_sweep": False})
    assert prepare_run_folder(cfg, tmp_path) is None  # claims it: checkpoints/ did not exist
    with pytest.raises(UserError, match=f"{tmp_path} already holds an empty checkpoints/ folder"):
        prepare_run_folder(cfg, tmp_path)


def test_evaluation_sums_are_not_saved_and_start_from_zero(tiny_corpus, tmp_path):
    model = language_model(100, hidden_size=8)
    assert {key.split(".")[0] for key in model.state_dict() if "ppl" in key} == {"train_ppl"}
    datamodule = PTBDataModule(
        dir=tiny_corpus, cache_dir=tmp_path / "cache", url="file:///nowhere", batch_size=4
    )
    model = language_model(datamodule.vocab_size, hidden_size=8)
    datamodule.setup("test")
    model.val_ppl.update(torch.tensor(1e6, dtype=torch.float64), 1)  # left over from an earlier pass
    trainer = quiet_trainer()
    (first,) = trainer.validate(model, dataloaders=datamodule.val_dataloader(), verbose=False)
    (second,) = trainer.validate(model, dataloaders=datamodule.val_dataloader(), verbose=False)
    assert first["val/ppl"] == second["val/ppl"] < 1e3


@pytest.mark.parametrize(
    "limit",
    ["trainer.max_steps=30", "trainer.limit_val_batches=0", "trainer.check_val_every_n_epoch=2"],
)
def test_a_run_without_validation_tests_its_last_weights(corpus, tmp_path, limit):
    run = tmp_path / "run"
    result = run_train(*TINY_RUN, *corpus, "trainer.max_epochs=1", limit, f"hydra.run.dir={run}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No validation ran" in result.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["status"], metrics["val_ppl"], metrics["best_checkpoint"]) == ("completed", None, "")
    if limit == "trainer.max_steps=30":  # the test's perplexity is the last weights'
        saved = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
        assert saved["global_step"] == 30
        evaluated = run_script(
            "evaluate.py",
            f"ckpt_path={run / 'checkpoints/last.ckpt'}",
            *corpus,
            f"hydra.run.dir={tmp_path / 'evaluation'}",
        )
        assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
        ppl = json.loads((tmp_path / "evaluation" / "evaluation.json").read_text())["ppl"]
        assert metrics["test_ppl"] == pytest.approx(ppl, rel=1e-6)


def test_a_trainer_that_would_reorder_the_windows_is_refused(corpus, tmp_path):
    result = run_train(
        *TINY_RUN, *corpus, "trainer.use_distributed_sampler=true", f"hydra.run.dir={tmp_path / 'run'}"
    )
    assert result.returncode == 1
    assert "set trainer.use_distributed_sampler=false" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_resuming_on_data_with_another_vocabulary_is_refused(corpus, tmp_path):
    run = tmp_path / "run"
    first = run_train(*TINY_RUN, *corpus, "trainer.max_epochs=1", f"hydra.run.dir={run}")
    assert first.returncode == 0, first.stdout + first.stderr
    other = write_corpus(
        tmp_path / "other", {split: ["some other words here"] * 400 for split in ("train", "valid", "test")}
    )
    result = run_train(*TINY_RUN, f"data.dir={other}", corpus[1], f"resume={run}")
    assert result.returncode == 1
    assert "resume: the checkpoint's vocabulary" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_testing_the_best_checkpoint_leaves_the_runs_wall_clock_alone(tiny_corpus, tmp_path):
    """Lightning restores the callbacks' state whenever it loads a checkpoint, the final test's
    included: the clock must not take that checkpoint's time for an earlier process's (metrics.json's
    wall_seconds was about twice the run's)."""
    started = time.perf_counter()
    checkpointing = TrainingCheckpoint(str(tmp_path / "checkpoints"))
    datamodule = PTBDataModule(
        dir=tiny_corpus, cache_dir=tmp_path / "cache", url="file:///nowhere", batch_size=4, num_steps=10
    )
    model = language_model(datamodule.vocab_size, hidden_size=8)
    trainer = quiet_trainer(
        max_epochs=1, limit_train_batches=5, limit_val_batches=2, callbacks=[checkpointing]
    )
    trainer.fit(model, datamodule=datamodule)
    trainer.test(model, datamodule=datamodule, ckpt_path=checkpointing.last_path, weights_only=True)
    assert 0 < checkpointing.wall_seconds <= time.perf_counter() - started
