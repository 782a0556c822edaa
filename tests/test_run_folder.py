"""Which run folder a run may write to: a live run holds its own, and a refused run changes nothing there."""

import errno
import fcntl
import gc
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf

from lm import PROJECT_ROOT
from lm.errors import UserError
from lm.training.run_folder import LOCK_FILE, claim_run_folder, prepare_run_folder
from tests.conftest import TINY_RUN, run_train

NEW = OmegaConf.create({"resume": None, "overwrite": False, "continue_sweep": False})
NO_DATA = "data.dir=/nonexistent"  # a refusal must come before the data is read


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def earlier_run(folder: Path, checkpoints: dict[str, bytes]) -> Path:
    """A run folder as a finished (or killed) run left it, its lock file included."""
    for name, content in {
        ".hydra/config.yaml": b"model:\n  hidden_size: 650\n",
        ".hydra/hydra.yaml": b"hydra: {}\n",
        ".hydra/overrides.yaml": b"- model=medium\n",
        "train.log": b"the earlier run's log\n",
        LOCK_FILE: b"pid 1 on elsewhere\n",
        **{f"checkpoints/{file}": data for file, data in checkpoints.items()},
    }.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    (folder / "checkpoints").mkdir(exist_ok=True)
    return folder


def refused(result: subprocess.CompletedProcess, message: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert any(message in line for line in output.splitlines()), output  # one line holds it all
    assert "Traceback" not in output


@pytest.fixture
def live_run():
    """Starts a process that claims a folder as train.py does (checkpoints/ made, nothing saved) and
    lives on; yields a function of the folder that returns that process."""
    started = []

    def start(folder: Path, claim: str = "prepare_run_folder(NEW, folder)") -> subprocess.Popen:
        code = (
            "import sys, time; from pathlib import Path; from omegaconf import OmegaConf; "
            "from lm.training.run_folder import claim_sweep_folder, prepare_run_folder; "
            "NEW = OmegaConf.create({'resume': None, 'overwrite': False, 'continue_sweep': False}); "
            "folder = Path(sys.argv[1]); "
            f"{claim}; print('held', flush=True); time.sleep(600)"
        )
        process = subprocess.Popen(
            [sys.executable, "-c", code, str(folder)], cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True
        )
        started.append(process)
        assert process.stdout.readline() == "held\n"
        return process

    yield start
    for process in started:
        process.kill()
        process.wait()


def test_a_refused_run_leaves_the_earlier_runs_folder_byte_for_byte(tmp_path):
    run = earlier_run(tmp_path / "run", {"last.ckpt": b"weights", "epoch00-val_ppl9.ckpt": b"best"})
    before = files(run)
    result = run_train(*TINY_RUN, NO_DATA, f"hydra.run.dir={run}")
    refused(result, f"{run} already holds the checkpoints of an earlier run. Resume it with resume={run}")
    assert files(run) == before  # .hydra/config.yaml, overrides.yaml and train.log included


def test_a_live_runs_folder_is_refused_even_with_overwrite(tmp_path, live_run):
    run = tmp_path / "run"
    holder = live_run(run)  # started, nothing saved yet: an empty checkpoints/
    before = files(run)
    live = f"{run} is held by a run that is running now (pid {holder.pid} on "
    overwrite = run_train(*TINY_RUN, NO_DATA, "overwrite=true", f"hydra.run.dir={run}")
    refused(overwrite, f"overwrite=true: {live}")
    assert files(run) == before and (run / "checkpoints").is_dir()  # not deleted under the live run
    refused(run_train(*TINY_RUN, NO_DATA, f"hydra.run.dir={run}"), live)
    assert files(run) == before


def test_a_run_killed_before_saving_leaves_its_folder_to_overwrite(tmp_path, live_run, tiny_corpus):
    run = tmp_path / "run"
    holder = live_run(run)
    holder.send_signal(signal.SIGKILL)  # before it saved anything: the kernel lets its lock go
    holder.wait()
    before = files(run)
    result = run_train(*TINY_RUN, NO_DATA, f"hydra.run.dir={run}")
    refused(result, f"{run} already holds an empty checkpoints/ folder: the run there stopped before saving")
    assert "overwrite=true" in result.stdout and "resume=" not in result.stdout
    assert files(run) == before

    corpus = [f"data.dir={tiny_corpus}", f"data.cache_dir={tmp_path / 'cache'}"]
    again = run_train(*TINY_RUN, *corpus, "trainer.max_epochs=1", "overwrite=true", f"hydra.run.dir={run}")
    assert again.returncode == 0, again.stdout + again.stderr
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / LOCK_FILE).read_text() != before[LOCK_FILE].decode()  # the new run's pid


def test_a_live_run_is_not_resumed_under_it(tmp_path, live_run):
    run = tmp_path / "run"
    holder = live_run(run)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"being written by the live run")
    before = files(run)
    result = run_train(*TINY_RUN, NO_DATA, f"resume={run}")
    refused(result, f"resume={run}: {run} is held by a run that is running now (pid {holder.pid} on ")
    assert files(run) == before  # no .hydra/resumed-<time>/ either


def test_a_sweep_started_while_another_holds_its_folder_writes_nothing(tmp_path, live_run):
    sweep = tmp_path / "sweep"
    live_run(sweep, claim="claim_sweep_folder(NEW, folder)")
    before = files(sweep)
    result = run_train("-m", *TINY_RUN, NO_DATA, "model.net.dropout=0.0,0.3", f"hydra.sweep.dir={sweep}")
    refused(result, f"hydra.sweep.dir={sweep} is held by a sweep that is running now")
    assert files(sweep) == before and not [p for p in sweep.iterdir() if p.is_dir()]


def test_an_unwritable_run_folder_is_one_line_before_any_data_is_read(tmp_path):
    (tmp_path / "file").write_text("a regular file")  # root writes through chmod; not under a file
    run = tmp_path / "file" / "run"
    result = run_train(*TINY_RUN, NO_DATA, f"hydra.run.dir={run}")
    refused(result, f"{run} cannot be written (Not a directory): give hydra.run.dir a folder")


@pytest.mark.parametrize(
    ("code", "call"),
    [(errno.EACCES, "mkdir"), (errno.EROFS, "mkdir"), (errno.ENOSPC, "fsync")],
)
def test_a_read_only_or_full_run_folder_is_a_user_error_naming_it(code, call, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    if call == "mkdir":
        monkeypatch.setattr(Path, "mkdir", fail)
    else:
        monkeypatch.setattr(os, "fsync", fail)
    run = tmp_path / "run"
    with pytest.raises(UserError) as error:
        prepare_run_folder(NEW, run)
    assert str(error.value) == (
        f"{run} cannot be written ({os.strerror(code)}): give hydra.run.dir a folder this run may write to."
    )


def test_the_lock_is_held_until_the_process_ends(tmp_path):
    claim_run_folder(NEW, tmp_path)
    gc.collect()  # nothing but the module keeps the lock file open
    with open(tmp_path / LOCK_FILE) as other, pytest.raises(BlockingIOError):
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert (tmp_path / LOCK_FILE).read_text().startswith(f"pid {os.getpid()} on ")


def test_only_rank_zero_claims_the_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert prepare_run_folder(NEW, tmp_path / "run") is None
    assert not (tmp_path / "run").exists()  # rank 0 made it and holds it


@pytest.fixture
def slurm_job(monkeypatch):
    for name, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "42"}.items():
        monkeypatch.setenv(name, value)


def test_a_requeued_slurm_job_goes_on_from_the_last_checkpoint_its_earlier_process_saved(tmp_path, slurm_job):
    run = earlier_run(tmp_path / "run", {})
    checkpoint = {"saved": "at the requeue signal", "run_config": OmegaConf.to_container(NEW)}
    torch.save(checkpoint, run / "checkpoints" / "last.ckpt")
    (run / LOCK_FILE).write_text("pid 1 on node7, SLURM job 4242\n")
    with pytest.raises(UserError, match="already holds the checkpoints of an earlier run"):
        prepare_run_folder(NEW, run)  # another job's run
    (run / LOCK_FILE).write_text("pid 1 on node7, SLURM job 42\n")  # this job's, before its requeue
    assert prepare_run_folder(NEW, run) == run / "checkpoints" / "last.ckpt"
    assert (run / LOCK_FILE).read_text() == f"pid {os.getpid()} on {socket.gethostname()}, SLURM job 42\n"
