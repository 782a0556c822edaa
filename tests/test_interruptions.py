"""A run stopped anywhere and resumed gives the numbers of a run that never stopped (docs/design.md,
"Interruptions"): signals sent at exact points of train.py runs, each resumed run compared with one
that never stopped, same seed, dropout on, an lr that decays inside the run."""

import json
import os
import re
import shlex
import shutil
import stat
from datetime import datetime
from pathlib import Path

import pytest
import torch
from conftest import TINY_NETWORKS, TINY_RUN, run_train, write_corpus, write_tiny_corpus
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

pytestmark = pytest.mark.slow

RUN = [
    *TINY_RUN,
    "model.net.dropout=0.3",
    "trainer.log_every_n_steps=1",
    "trainer.max_epochs=3",
    "model.decay_after=1",  # the lr halves after every epoch from the second on
    "model.lr_decay=0.5",
]
# NT-ASGD: the corpus below teaches "a b c d" and validates on "a c b d", so validation worsens as
# training goes on, and asgd_nonmono=1 switches after the third epoch's validation.
CONFIGURATIONS = {
    "plain": [],
    "variable_windows": ["data.vary_num_steps=true"],
    "half_epoch_validation": ["trainer.val_check_interval=0.5"],
    # Validation every 30 steps: the epoch's end ranks the best checkpoint by step 90's validation.
    "interval_validation": ["trainer.val_check_interval=30"],
    "accumulation": ["trainer.accumulate_grad_batches=2"],  # a step every two windows
    "nt_asgd": ["model.asgd_nonmono=1", "model.lr_decay=1.0", "trainer.max_epochs=5"],
    # The other networks, each from its preset at RUN's size, with dropout on as RUN's LSTM.
    **{name: [*run, "model.net.dropout=0.3"] for name, run in TINY_NETWORKS.items()},
}
STEPS = 100  # windows per epoch of the plain corpus (8 streams of 20 tokens)
ASGD_STEPS = 21  # and of the NT-ASGD one
TAGS = ("val/ppl", "train/epoch_ppl", "lr", "train/loss")


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, list[str]]:
    root = tmp_path_factory.mktemp("corpora")
    plain = write_tiny_corpus(root / "plain", train_lines=1900)
    asgd = write_corpus(
        root / "asgd", {"train": ["a b c d"] * 700, "valid": ["a c b d"] * 60, "test": ["a c b d"] * 60}
    )
    return {
        name: [f"data.dir={asgd if name == 'nt_asgd' else plain}", f"data.cache_dir={root / 'cache'}"]
        for name in CONFIGURATIONS
    }


@pytest.fixture(scope="module")
def references(corpora, tmp_path_factory):
    """The uninterrupted run of each configuration, made when a test first needs it."""
    runs: dict[str, Path] = {}

    def reference(name: str) -> Path:
        if name not in runs:
            run = tmp_path_factory.mktemp(f"reference-{name}") / "run"
            result = run_train(*arguments(corpora, name), f"hydra.run.dir={run}")
            assert result.returncode == 0, result.stdout + result.stderr
            last = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
            epochs = json.loads((run / "metrics.json").read_text())["epochs"]
            assert last["epoch"] + 1 == epochs  # the (0-based) last epoch, whichever was the best
            runs[name] = run
        return runs[name]

    return reference


def arguments(corpora, name: str) -> list[str]:
    lstm = name not in TINY_NETWORKS  # RUN's model.net keys are the LSTM's
    return [
        *(a for a in RUN if lstm or not a.startswith("model.net.")),
        *CONFIGURATIONS[name],
        *corpora[name],
    ]


def signal_at(marker: Path, point: str, signal_name: str = "SIGTERM", **where: int | str) -> list[str]:
    chosen = [f"+callbacks.signal_at.{key}={value}" for key, value in where.items()]
    return [
        "+callbacks.signal_at._target_=tests.signal_at.SignalAt",
        f"+callbacks.signal_at.point={point}",
        f"+callbacks.signal_at.marker={marker}",
        f"+callbacks.signal_at.signal_name={signal_name}",
        *chosen,
    ]


def scalars(run: Path) -> dict[str, dict[int, float]]:
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: {e.step: e.value for e in events.Scalars(tag)} for tag in TAGS if tag in events.Tags()["scalars"]
    }


def assert_same_run(run: Path, reference: Path) -> None:
    """Per-epoch validation, every step's lr and loss, the epoch perplexities, the best epoch, the
    final weights and the test perplexity: equal, not close (one process computes both)."""
    logged, expected = scalars(run), scalars(reference)
    assert logged.keys() == expected.keys()
    for tag in expected:
        assert logged[tag] == expected[tag], tag
    metrics, wanted = (json.loads((r / "metrics.json").read_text()) for r in (run, reference))
    for key in ("status", "val_ppl", "test_ppl", "test_acc", "epochs"):
        assert metrics[key] == wanted[key], key
    assert Path(metrics["best_checkpoint"]).name == Path(wanted["best_checkpoint"]).name
    listing, expected_listing = (
        sorted(p.name for p in (r / "checkpoints").iterdir()) for r in (run, reference)
    )
    assert listing == expected_listing  # no stale best checkpoint, no "-v1", no partial file
    final = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    reference_final = torch.load(reference / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    for name, tensor in reference_final["state_dict"].items():
        assert torch.equal(final["state_dict"][name], tensor), name
    assert final["global_step"] == reference_final["global_step"]


def stop_and_resume(corpora, name: str, run: Path, signal_args: list[str], env: dict | None = None):
    """The run, stopped by the signal; then the command it printed, as a user would run it."""
    stopped = run_train(*arguments(corpora, name), *signal_args, f"hydra.run.dir={run}", env=env)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "Stopped by SIG" in stopped.stdout, stopped.stdout
    assert not (run / "metrics.json").exists()
    command = shlex.split(stopped.stdout.split("Continue with: python train.py ")[1].splitlines()[0])
    assert command[-1] == f"resume={run}"
    resumed = run_train(*command, env=env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    return stopped, resumed


@pytest.mark.parametrize(
    ("name", "point", "where", "stopped_at"),
    [
        ("plain", "step", {"step": STEPS + 37}, f"at step {STEPS + 37} (epoch 2)"),
        ("plain", "last_step", {"epoch": 2}, f"at the end of epoch 2 (step {2 * STEPS})"),
        ("plain", "validation", {"epoch": 1, "batch": 3}, f"at the end of epoch 1 (step {STEPS})"),
        ("variable_windows", "step", {"step": STEPS + 30}, f"at step {STEPS + 30} (epoch 2)"),
        ("variable_windows", "validation", {"epoch": 2, "batch": 2}, "at the end of epoch 2"),
        # Validation after half of each epoch: stopped at the step after the mid-epoch validation.
        ("half_epoch_validation", "validation", {"epoch": 2, "batch": 1}, f"at step {STEPS + 51} (epoch 2)"),
        ("half_epoch_validation", "step", {"step": STEPS + 20}, f"at step {STEPS + 20} (epoch 2)"),
        ("interval_validation", "step", {"step": 2 * STEPS + 95}, f"at step {2 * STEPS + 95} (epoch 3)"),
        # A signal between two windows of one step: the stop waits for the step.
        ("accumulation", "batch", {"epoch": 2, "batch": 30}, f"at step {STEPS // 2 + 16} (epoch 2)"),
        ("nt_asgd", "validation", {"epoch": 4, "batch": 1}, f"at the end of epoch 4 (step {4 * ASGD_STEPS})"),
        ("nt_asgd", "step", {"step": 4 * ASGD_STEPS + 10}, f"at step {4 * ASGD_STEPS + 10} (epoch 5)"),
        ("mogrifier", "step", {"step": STEPS + 37}, f"at step {STEPS + 37} (epoch 2)"),
        ("mogrifier", "validation", {"epoch": 1, "batch": 3}, "at the end of epoch 1"),  # variable windows
        ("xlstm", "step", {"step": STEPS + 37}, f"at step {STEPS + 37} (epoch 2)"),
        ("xlstm", "validation", {"epoch": 1, "batch": 3}, f"at the end of epoch 1 (step {STEPS})"),
    ],
)
def test_a_signal_stops_at_a_safe_point_and_the_run_resumes_exactly(
    corpora, references, tmp_path, name, point, where, stopped_at
):
    run = tmp_path / "run"
    stopped, _ = stop_and_resume(corpora, name, run, signal_at(tmp_path / "fired", point, **where))
    assert f"Stopped by SIGTERM {stopped_at}" in stopped.stdout
    assert_same_run(run, references(name))


def test_ctrl_c_stops_at_a_safe_point_like_sigterm_and_the_run_resumes_exactly(corpora, references, tmp_path):
    """And metrics.json's wall_seconds counts both processes: at least the span of each one's log (the
    first one's to its stop). The stop comes late, so the last process alone is far less."""
    run = tmp_path / "run"
    stopped, resumed = stop_and_resume(
        corpora, "plain", run, signal_at(tmp_path / "fired", "step", "SIGINT", step=3 * STEPS - 10)
    )
    assert f"Stopped by SIGINT at step {3 * STEPS - 10} (epoch 3)" in stopped.stdout
    assert "press Ctrl-C again to stop at once" in stopped.stderr
    assert "Traceback" not in stopped.stdout + stopped.stderr
    assert_same_run(run, references("plain"))
    spans = [logged_seconds(process.stdout) for process in (stopped, resumed)]
    assert spans[0] > 2 * spans[1] - 1  # the first process did most of the work
    assert json.loads((run / "metrics.json").read_text())["wall_seconds"] >= sum(spans) - 0.2


def test_a_second_ctrl_c_stops_at_once_and_the_run_resumes_from_its_last_checkpoint(
    corpora, references, tmp_path
):
    run = tmp_path / "run"
    signal_args = signal_at(tmp_path / "fired", "step", "SIGINT", step=STEPS + 37, repeat=2)
    stopped = run_train(*arguments(corpora, "plain"), *signal_args, f"hydra.run.dir={run}")
    assert stopped.returncode == 1, stopped.stdout + stopped.stderr
    assert f"Interrupted by a second Ctrl-C at step {STEPS + 37}: stopped at once" in stopped.stdout
    assert "Traceback" not in stopped.stdout + stopped.stderr
    saved = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == STEPS  # the end of epoch 1, untouched by the stop
    command = shlex.split(stopped.stdout.split("Continue with: python train.py ")[1].splitlines()[0])
    resumed = run_train(*command)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_same_run(run, references("plain"))


def logged_seconds(log: str) -> float:
    """Seconds from a process's first logged line to its last."""
    stamps = re.findall(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]", log, re.MULTILINE)
    first, last = (datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f") for stamp in (stamps[0], stamps[-1]))
    return (last - first).total_seconds()


def test_a_second_ctrl_c_during_the_final_test_is_one_line_and_keeps_the_checkpoints(corpora, tmp_path):
    run = tmp_path / "run"
    signal_args = signal_at(tmp_path / "fired", "test", "SIGINT", batch=2, repeat=2)
    result = run_train(*arguments(corpora, "plain"), *signal_args, f"hydra.run.dir={run}")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Interrupted by a second Ctrl-C during the final test: training is complete" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr and not (run / "metrics.json").exists()
    saved = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 3 * STEPS


def test_ctrl_c_in_a_terminal_stops_a_ddp_spawn_run_at_a_safe_point(corpora, tmp_path):
    """Ctrl-C reaches the launching process as well as the workers: it waits for them to save."""
    run = tmp_path / "run"
    spawn = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp_spawn"]
    ctrl_c = [
        *signal_at(tmp_path / "fired", "step", "SIGINT", step=STEPS + 20),
        "+callbacks.signal_at.group=true",
    ]
    stopped = run_train(
        *arguments(corpora, "plain"), *spawn, *ctrl_c, f"hydra.run.dir={run}", prefix=("setsid",)
    )
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert f"Stopped by SIGINT at step {STEPS + 20} (epoch 2): saved" in stopped.stdout
    assert "Continue with: python train.py" in stopped.stdout and "Traceback" not in stopped.stderr
    saved = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == STEPS + 20


def test_sigusr1_off_slurm_stops_like_sigterm(corpora, references, tmp_path):
    run = tmp_path / "run"
    stopped, _ = stop_and_resume(
        corpora, "plain", run, signal_at(tmp_path / "fired", "step", "SIGUSR1", step=STEPS + 5)
    )
    assert f"Stopped by SIGUSR1 at step {STEPS + 5} (epoch 2)" in stopped.stdout
    assert_same_run(run, references("plain"))


@pytest.mark.parametrize(
    ("point", "where"), [("validation", {"epoch": 3, "batch": 2}), ("fit_end", {}), ("test", {"batch": 2})]
)
def test_a_signal_after_the_last_step_lets_the_test_finish(corpora, references, tmp_path, point, where):
    run = tmp_path / "run"
    args = [*arguments(corpora, "plain"), *signal_at(tmp_path / "fired", point, **where)]
    result = run_train(*args, f"hydra.run.dir={run}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SIGTERM arrived after the last training step: the test was finished" in result.stdout
    assert_same_run(run, references("plain"))  # last.ckpt too: the end of training, not the best epoch


def test_kill_9_then_resume_goes_on_from_the_last_epoch_end(corpora, references, tmp_path):
    run = tmp_path / "run"
    signal_args = signal_at(tmp_path / "fired", "step", "SIGKILL", step=STEPS + 61)
    killed = run_train(*arguments(corpora, "plain"), *signal_args, f"hydra.run.dir={run}")
    assert killed.returncode == -9
    assert not list((run / "checkpoints").glob(".last.ckpt.partial-*"))
    resumed = run_train(*arguments(corpora, "plain"), *signal_args, f"resume={run}")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_same_run(run, references("plain"))


def test_a_moved_run_folder_resumes_with_its_best_scores(corpora, references, tmp_path):
    run, moved = tmp_path / "run", tmp_path / "elsewhere" / "run"
    signal_args = signal_at(tmp_path / "fired", "step", step=2 * STEPS + 10)
    stopped = run_train(*arguments(corpora, "plain"), *signal_args, f"hydra.run.dir={run}")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    moved.parent.mkdir()
    shutil.move(run, moved)
    resumed = run_train(*arguments(corpora, "plain"), *signal_args, f"resume={moved}")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "dirpath has changed" not in resumed.stdout + resumed.stderr
    assert sorted(p.name for p in (moved / "checkpoints").iterdir()) == sorted(
        p.name for p in (references("plain") / "checkpoints").iterdir()
    )  # one last.ckpt, the same best checkpoint: none written over a better one
    assert_same_run(moved, references("plain"))


def test_a_requeued_slurm_job_saves_requeues_and_goes_on_in_its_folder(corpora, references, tmp_path):
    stub = tmp_path / "bin" / "scontrol"
    stub.parent.mkdir()
    stub.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "requeued"}\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    slurm = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "4242"}
    env = {**os.environ, **slurm, "PATH": f"{stub.parent}:{os.environ['PATH']}"}
    run = tmp_path / "run"
    args = [*arguments(corpora, "plain"), *signal_at(tmp_path / "fired", "step", "SIGUSR1", step=STEPS + 44)]
    stopped = run_train(*args, f"hydra.run.dir={run}", env=env)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "requeued SLURM job 4242" in stopped.stdout
    assert (tmp_path / "requeued").read_text() == "requeue 4242\n"
    again = run_train(*args, f"hydra.run.dir={run}", env=env)  # the requeued job: the same command
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resuming from {run / 'checkpoints' / 'last.ckpt'}" in again.stdout
    assert_same_run(run, references("plain"))


def test_two_processes_stopped_mid_epoch_resume_exactly(corpora, tmp_path):
    # Against an uninterrupted run on two processes: one summation order on both sides, so exact.
    two_processes = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]
    reference = tmp_path / "reference"
    result = run_train(*arguments(corpora, "plain"), *two_processes, f"hydra.run.dir={reference}")
    assert result.returncode == 0, result.stdout + result.stderr
    run = tmp_path / "run"
    signal_args = signal_at(tmp_path / "fired", "step", step=STEPS + 23)  # to rank 0 only
    stopped = run_train(*arguments(corpora, "plain"), *two_processes, *signal_args, f"hydra.run.dir={run}")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert f"Stopped by SIGTERM at step {STEPS + 23} (epoch 2)" in stopped.stdout
    resumed = run_train(*arguments(corpora, "plain"), *two_processes, *signal_args, f"resume={run}")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_same_run(run, reference)
