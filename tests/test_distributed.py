"""DDP on two CPU processes (gloo) against one process (docs/design.md, "Many devices")."""

import json
import os
import random
import socket
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lm.training.trainer import build_trainer
from tests.conftest import TINY_RUN, compose_config, run_train, write_tiny_corpus

TWO_PROCESSES = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]
# Only the summation order of float32 sums differs (measured: 3e-6 at most); a rank reading the
# wrong rows, a window lost or a loss not averaged moves these numbers by 1e-2 or more.
TOLERANCE = 2e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, list[str]]:
    """A folder for the module's runs, and the overrides of an exact run (dropout 0, every step logged)."""
    root = tmp_path_factory.mktemp("distributed")
    corpus = write_tiny_corpus(root / "tiny")
    overrides = [*TINY_RUN, f"data.dir={corpus}", f"data.cache_dir={root / 'cache'}"]
    return root, [*overrides, "model.net.dropout=0.0", "trainer.log_every_n_steps=1"]


@pytest.fixture(scope="module")
def runs(tiny) -> dict[str, Path]:
    """The same run on one and on two processes.

    The two-process run uses the default run folder under its working directory, as a user's
    `python train.py` does, so that a child process resolving `${now:...}` anew would show.
    """
    root, overrides = tiny
    one = run_train(*overrides, f"hydra.run.dir={root / 'one'}")
    (root / "work").mkdir()
    two = run_train(*overrides, *TWO_PROCESSES, cwd=root / "work")
    assert one.returncode == 0, one.stdout + one.stderr
    assert two.returncode == 0, two.stdout + two.stderr
    (two_dir,) = (root / "work" / "outputs").glob("*/*")
    return {"one": root / "one", "two": two_dir, "work": root / "work"}


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


@pytest.mark.parametrize("tag", ["train/loss", "val/ppl", "test/ppl"])
def test_two_processes_give_the_one_process_numbers(runs, tag):
    one, two = scalars(runs["one"], tag), scalars(runs["two"], tag)
    assert [step for step, _ in two] == [step for step, _ in one]
    assert len(one) > 1 or tag == "test/ppl"
    assert [value for _, value in two] == pytest.approx([value for _, value in one], rel=TOLERANCE)


def test_two_processes_report_the_one_process_metrics(runs):
    one, two = (json.loads((runs[name] / "metrics.json").read_text()) for name in ("one", "two"))
    for key in ("val_ppl", "test_ppl", "test_acc"):
        assert two[key] == pytest.approx(one[key], rel=TOLERANCE)
    assert two["epochs"] == one["epochs"] == 2


def test_two_processes_write_one_run_folder(runs):
    work = runs["work"]
    assert sorted(p.relative_to(work).as_posix() for p in work.glob("outputs/*/*")) == [
        runs["two"].relative_to(work).as_posix()
    ]
    assert sorted(p.name for p in runs["two"].iterdir()) == [
        ".hydra",
        "checkpoints",
        "metrics.json",
        "run.lock",  # rank 0's only: it holds the folder
        "tensorboard",
        "train.log",
        "train_ddp_process_1.log",  # rank 1's log: Lightning names its Hydra job so
    ]
    assert sorted(p.name for p in (runs["two"] / "checkpoints").iterdir()) == sorted(
        p.name for p in (runs["one"] / "checkpoints").iterdir()
    )
    assert all(p.is_file() for p in (runs["two"] / "tensorboard").iterdir())  # one TensorBoard run


def test_a_batch_that_does_not_divide_among_the_processes_is_a_clear_error(tiny_corpus, tmp_path):
    result = run_train(
        *TINY_RUN,
        *TWO_PROCESSES,
        "data.batch_size=7",
        f"data.dir={tiny_corpus}",
        f"data.cache_dir={tmp_path / 'cache'}",
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "data.batch_size=7 streams do not divide among 2 processes; choose a multiple of 2" in (
        result.stdout
    )


def test_a_sweep_cannot_relaunch_itself_through_ddp(tiny, tmp_path):
    _, overrides = tiny
    result = run_train("-m", *overrides, *TWO_PROCESSES, "model.net.hidden_size=16,32", cwd=tmp_path)
    assert result.returncode == 1
    assert "A Hydra sweep (-m) cannot train on 2 processes with Lightning's ddp strategy" in result.stdout
    assert "Add trainer.strategy=ddp_spawn" in result.stdout
    jobs = [p.name.split("_")[0] for p in tmp_path.glob("outputs/multirun/*/*/*") if p.is_dir()]
    assert jobs == ["0"]  # stopped at once
    assert not list(tmp_path.rglob("train_ddp_process_*"))


def test_a_sweep_trains_each_run_on_two_spawned_processes(tiny, runs, tmp_path):
    _, overrides = tiny
    spawn = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp_spawn"]
    result = run_train("-m", *overrides, *spawn, "model.net.hidden_size=16,32", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = sorted(p for p in tmp_path.glob("outputs/multirun/*/*/*") if p.is_dir())
    assert [job.name.split("_")[0] for job in jobs] == ["0", "1"]
    metrics = [json.loads((job / "metrics.json").read_text()) for job in jobs]
    for job, job_metrics in zip(jobs, metrics, strict=True):  # a failed run: its error and log
        assert job_metrics["status"] == "completed", f"{job_metrics}\n{(job / 'train.log').read_text()}"
    one = json.loads((runs["one"] / "metrics.json").read_text())  # hidden size 16 on one process
    assert metrics[0]["val_ppl"] == pytest.approx(one["val_ppl"], rel=TOLERANCE)
    assert metrics[0]["test_ppl"] == pytest.approx(one["test_ppl"], rel=TOLERANCE)
    assert metrics[1]["val_ppl"] != pytest.approx(one["val_ppl"], rel=1e-3)
    for job, job_metrics in zip(jobs, metrics, strict=True):
        assert job_metrics["epochs"] == 2 and job_metrics["train_tokens_per_sec"] > 0
        assert f"val_ppl{job_metrics['val_ppl']:.2f}" in job_metrics["best_checkpoint"]
        assert Path(job_metrics["best_checkpoint"]).parent == job / "checkpoints"


PORT_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")  # where the kernel takes port 0's ports from
SPAWN = ("trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp_spawn")


@pytest.fixture
def no_port_set(monkeypatch):
    """No MASTER_PORT during the test, and as before after it: the one the Trainer sets would stay in
    this worker's environment, for every later run it starts. Set first, so that the teardown
    restores what was there (a delenv of an absent variable records nothing)."""
    monkeypatch.setenv("MASTER_PORT", "")
    monkeypatch.delenv("MASTER_PORT")
    monkeypatch.delenv("STANDALONE_PORT", raising=False)


def port_of(*overrides: str) -> str | None:
    """The MASTER_PORT the processes of train.py's Trainer would meet on."""
    build_trainer(compose_config(*overrides).trainer, logger=False)
    return os.environ.get("MASTER_PORT")


@pytest.mark.skipif(not PORT_RANGE.exists(), reason="the kernel's port range is Linux's")
def test_the_processes_meet_below_the_range_any_socket_bound_to_port_0_may_take(no_port_set):
    """Lightning's own MASTER_PORT is one that port 0 gave, and any socket bound to port 0 may take
    it before the processes meet there (EADDRINUSE: seen once in CI, in the ddp_spawn sweep above)."""
    port = int(port_of(*SPAWN))
    assert 1024 <= port < int(PORT_RANGE.read_text().split()[0])


@pytest.mark.skipif(not PORT_RANGE.exists(), reason="the kernel's port range is Linux's")
def test_a_port_in_use_is_passed_over(no_port_set, monkeypatch):
    with socket.socket() as busy:
        busy.bind(("", 0))
        taken = busy.getsockname()[1]
        monkeypatch.setattr(random.SystemRandom, "sample", lambda self, ports, k: [taken, *ports[:3]])
        assert port_of(*SPAWN) not in (None, str(taken))


def test_a_port_already_set_is_kept_and_one_process_sets_none(no_port_set, monkeypatch):
    assert port_of("trainer.accelerator=cpu", "trainer.devices=1") is None
    monkeypatch.setenv("MASTER_PORT", "29500")  # the user's, or an earlier run's of the same sweep
    assert port_of(*SPAWN) == "29500"
