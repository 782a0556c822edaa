"""Resuming exactly, preemption, divergence, other runs' folders and bad configuration."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lm import PROJECT_ROOT
from lm.callbacks import Preemption
from lm.data import PTBDataModule
from lm.errors import UserError
from lm.module import LanguageModel
from lm.resume import prepare_run_folder
from tests.conftest import TINY_RUN, run_train, write_tiny_corpus

# Dropout on, so that only a restored random state can give the same numbers.
EXACT = [*TINY_RUN, "model.dropout=0.3", "trainer.log_every_n_steps=1"]
STEPS = 636  # training steps in an epoch of the corpus below (8 streams of 20-token windows)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[str]:
    """A corpus long enough for a signal to land in the middle of an epoch (STEPS each)."""
    root = tmp_path_factory.mktemp("reliability")
    folder = write_tiny_corpus(root / "data", train_lines=12000)
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
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]


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


def test_sigterm_saves_the_run_mid_epoch_and_it_resumes_exactly(corpus, uninterrupted, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, str(PROJECT_ROOT / "train.py"), *EXACT, *corpus, f"hydra.run.dir={run}"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / "last.ckpt").exists():  # the first epoch has ended
        assert time.monotonic() < deadline and process.poll() is None, process.stdout.read()
        time.sleep(0.05)
    time.sleep(0.5)  # most often into the second epoch; on a busy machine maybe still the first's end
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert "Stopped by SIGTERM at step" in output
    stopped_at = int(output.split("Stopped by SIGTERM at step ")[1].split(":")[0])
    assert STEPS <= stopped_at < 2 * STEPS  # in the second epoch, or right at its start
    assert not (run / "metrics.json").exists()

    command = output.split("Continue with: python train.py ")[1].splitlines()[0].split()  # as printed
    assert command[-1] == f"resume={run}"
    resumed = run_train(*command)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_same_run(run, uninterrupted)


def test_resuming_with_another_configuration_is_refused(corpus, uninterrupted):
    result = run_train(*EXACT, *corpus, "model.dropout=0.5", f"resume={uninterrupted}")
    assert result.returncode == 1
    assert "model.dropout=0.3 then, 0.5 now" in result.stdout


def test_a_damaged_checkpoint_cannot_be_resumed(corpus, uninterrupted, tmp_path):
    damaged = tmp_path / "run" / "checkpoints" / "last.ckpt"
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes((uninterrupted / "checkpoints" / "last.ckpt").read_bytes()[:5000])
    result = run_train(*EXACT, *corpus, f"resume={tmp_path / 'run'}")
    assert result.returncode == 1
    assert f"resume: {damaged} cannot be read" in result.stdout


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
        ("model.dropout=1.0", "model.dropout=1.0 is not allowed: it must be a number in [0, 1)."),
        ("model.hidden_size=0", "model.hidden_size=0 is not allowed: it must be an integer, 1 or more."),
        ("model.lr=-1", "model.lr=-1 is not allowed: it must be a number, 0 or more."),
        ("model.num_layers=two", "model.num_layers='two' is not allowed: it must be an integer, 1 or more."),
        ("model=huge", "Available options in 'model':\n\tawd\n\tawd_cpu\n\tlarge\n\tmedium\n\tsmall"),
        ("model.weight_drop=0.5x", "model.weight_drop='0.5x' is not allowed: it must be a number in [0, 1)."),
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
    cfg = OmegaConf.create({"resume": None, "overwrite": False})
    assert prepare_run_folder(cfg, tmp_path) is None  # claims it: checkpoints/ did not exist
    with pytest.raises(UserError, match=f"{tmp_path} already holds an empty checkpoints/ folder"):
        prepare_run_folder(cfg, tmp_path)


def test_a_requeued_slurm_job_goes_on_in_its_folder(tmp_path, monkeypatch):
    for name, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "42"}.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "hpc_ckpt_1.ckpt").write_bytes(b"saved by Lightning before the requeue")
    cfg = OmegaConf.create({"resume": None, "overwrite": False})
    assert prepare_run_folder(cfg, tmp_path) is None  # no refusal: Lightning resumes from hpc_ckpt_1


def test_lightnings_own_sigterm_stop_saves_the_checkpoint_too(tiny_corpus, tmp_path):
    class SignalAfterPreemptionLooked(L.Callback):  # so that Lightning's epoch-end check sees it first
        def on_train_epoch_end(self, trainer, pl_module):
            os.kill(os.getpid(), signal.SIGTERM)

    datamodule = PTBDataModule(
        dir=tiny_corpus, cache_dir=tmp_path / "cache", url="file:///nowhere", batch_size=4
    )
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_top_k=0)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[Preemption(), SignalAfterPreemptionLooked(), checkpoint],
    )
    with pytest.raises(SIGTERMException):
        trainer.fit(LanguageModel(datamodule.vocab_size, hidden_size=8), datamodule=datamodule)
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["epoch"] == 1 and saved["global_step"] == trainer.global_step  # after the first epoch
