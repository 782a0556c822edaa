"""Which run folder a run writes to, and whether it may: new, resumed, or deliberately overwritten.

A live run holds its folder: rank 0 keeps an `fcntl.flock` on its `run.lock` until the process
ends (the kernel lets it go on any exit, kill -9 included, so a dead run never blocks a folder).
A sweep holds its sweep folder the same way. Hydra takes both (`ClaimRunFolder`) before it writes
`.hydra/` or `train.log` there, so a refused run leaves the folder as it found it.
"""

import fcntl
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import IO, Any

from hydra.experimental.callback import Callback
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from lm.errors import UserError, exit_on_user_error
from lm.options import dotted, is_setting
from lm.training.checkpoint_file import read_checkpoint, run_config_now
from lm.training.continuation import resume_argument, resume_checkpoint
from lm.training.trainer import slurm_job

log = logging.getLogger(__name__)

# May differ between a run and its resumption: how to resume, and how long to train (longer only).
RESUMABLE_CHANGES = {"resume", "overwrite", "continue_sweep", "trainer.max_epochs"}
LOCK_FILE = "run.lock"  # flock-ed by the live run (or sweep) that holds the folder; it holds its pid and host
# What this process holds ("run", "sweep"): the folder and its open lock file, kept open until the
# process ends. One run at a time: a sweep's runs follow each other, so the next releases the last.
_held: dict[str, tuple[Path, IO[str]]] = {}


class ClaimRunFolder(Callback):
    """conf/config.yaml's Hydra callback: claims the folder before Hydra writes anything into it (its
    `.hydra/` files, train.log), so that a refused run ends with one line and leaves it untouched."""

    @exit_on_user_error
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.continue_sweep:
            raise UserError(
                "continue_sweep=true goes on with an interrupted sweep: give it with -m, the sweep's own "
                "overrides and its hydra.sweep.dir (the command a stopped sweep prints)."
            )
        claim_run_folder(config, Path(str(config.hydra.run.dir)))

    @exit_on_user_error
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        claim_sweep_folder(config, Path(str(config.hydra.sweep.dir)))


def prepare_run_folder(cfg: DictConfig, run_dir: Path) -> Path | None:
    """The checkpoint to resume from, if any, after checking that the run folder may be used.

    A folder that already holds checkpoints belongs to an earlier run: it is resumed (`resume=`,
    or a requeued SLURM job's `last.ckpt`), replaced only when asked (`overwrite=true`), or left
    alone; one that a live run holds is refused whatever is asked.
    Claims the folder first where Hydra has not (a sweep's run, a test).
    """
    if cfg.resume:
        checkpoint = _resumed_checkpoint(cfg, run_dir)
        claim_run_folder(cfg, run_dir)
        _check_same_config(cfg, checkpoint)
        return checkpoint
    claim_run_folder(cfg, run_dir)
    if _requeued(cfg, run_dir) or cfg.continue_sweep:  # the same command again, where it stopped
        last = run_dir / "checkpoints" / "last.ckpt"
        if last.is_file():
            _check_same_config(cfg, last)
            return last
        if not cfg.continue_sweep:
            return None  # requeued before anything was saved: it starts again
    if rank_zero_only.rank != 0:
        return None
    checkpoints = run_dir / "checkpoints"
    if (cfg.overwrite or cfg.continue_sweep) and checkpoints.exists():  # continued: nothing to resume from
        for earlier in (checkpoints, run_dir / "tensorboard", run_dir / "metrics.json"):
            if earlier.is_dir():
                shutil.rmtree(earlier)
            elif earlier.exists():
                earlier.unlink()
            asked = "overwrite=true" if cfg.overwrite else "continue_sweep=true"
            log.warning("%s: deleted %s", asked, earlier)
    try:  # this process holds the folder; it is taken twice only by two runs of one sweep given one folder
        checkpoints.mkdir(parents=True)
    except FileExistsError:
        raise _earlier_run(run_dir) from None
    return None


def claim_run_folder(cfg: DictConfig, run_dir: Path) -> None:
    """Hold `run_dir` until this process ends (rank 0; the other ranks use the folder rank 0 holds).

    Refused, in one line: a folder a live run holds (whatever `resume=` or `overwrite=true` say),
    one that cannot be written, a bad `resume=`, and an earlier run's folder unless `resume=`,
    `overwrite=true` or a requeued SLURM job says what to do with it.
    """
    run_dir = Path(os.path.abspath(run_dir))  # as Hydra's runtime.output_dir
    if rank_zero_only.rank != 0 or run_dir == _held.get("run", (None,))[0]:
        return  # not rank 0, or claimed already (by ClaimRunFolder)
    if cfg.resume:
        _resumed_checkpoint(cfg, run_dir)
    advice = (
        f"resume={cfg.resume} continues the run in its own folder, which must be writable"
        if cfg.resume
        else "give hydra.run.dir a folder this run may write to"
    )
    lock = _lock(run_dir, advice, "run")
    if lock is None:
        raise _live(run_dir, "run", cfg)
    try:
        new = not (cfg.resume or cfg.overwrite or cfg.continue_sweep or _requeued(cfg, run_dir))
        if new and (run_dir / "checkpoints").exists():
            raise _earlier_run(run_dir)
        _hold("run", run_dir, lock, advice)
    except BaseException:
        lock.close()
        raise


def claim_sweep_folder(cfg: DictConfig, sweep_dir: Path) -> None:
    """Hold a sweep's folder until the sweeping process ends, so that two sweeps started in the same
    second (the same `outputs/multirun/<date>/<time>`) or given one `hydra.sweep.dir` do not share it.
    One that holds an earlier sweep's runs is refused unless `overwrite=true`."""
    sweep_dir = Path(os.path.abspath(sweep_dir))
    advice = "give hydra.sweep.dir a folder this sweep may write to"
    lock = _lock(sweep_dir, advice, "sweep")
    if lock is None:
        raise _live(sweep_dir, "sweep", cfg)
    try:
        earlier = (sweep_dir / "multirun.yaml").exists()
        if earlier and not (OmegaConf.select(cfg, "overwrite") or OmegaConf.select(cfg, "continue_sweep")):
            raise UserError(
                f"hydra.sweep.dir={sweep_dir} already holds an earlier sweep (its multirun.yaml): add "
                "continue_sweep=true to go on with its unfinished runs, give another hydra.sweep.dir, or add "
                "overwrite=true to replace that sweep's runs."
            )
        _hold("sweep", sweep_dir, lock, advice)
    except BaseException:
        lock.close()
        raise


def _lock(folder: Path, advice: str, kind: str) -> IO[str] | None:
    """`folder`'s lock file, locked by this process; None when a live run or sweep holds it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / LOCK_FILE, "a+")  # kept open while this process holds the folder
    except OSError as error:  # EACCES, EROFS, ENOSPC, or a path under a regular file
        raise _unwritable(folder, advice, error) from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return None
    except OSError as error:  # a file system without locks (Lustre mounted without flock, say)
        log.warning("%s cannot be locked (%s): another %s could use it at the same time", folder, error, kind)
    return lock


def _hold(kind: str, folder: Path, lock: IO[str], advice: str) -> None:
    """Keep `lock` open, with this process's pid and host in it for the message of a refused run."""
    try:
        lock.truncate(0)
        job = slurm_job()
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}{f', SLURM job {job}' if job else ''}\n")
        lock.flush()
        os.fsync(lock.fileno())  # a full disk shows here, before Hydra writes into the folder
    except OSError as error:
        raise _unwritable(folder, advice, error) from None
    previous = _held.get(kind)
    _held[kind] = (folder, lock)
    if previous:
        previous[1].close()


def _unwritable(folder: Path, advice: str, error: OSError) -> UserError:
    return UserError(f"{folder} cannot be written ({error.strerror or error}): {advice}.")


def _live(folder: Path, kind: str, cfg: DictConfig) -> UserError:
    holder = _lock_text(folder).strip() or "its pid not written yet"
    if kind == "sweep":
        return UserError(
            f"hydra.sweep.dir={folder} is held by a sweep that is running now ({holder}), started in the "
            "same second or given the same folder: start this one again, or give another hydra.sweep.dir."
        )
    asked = f"resume={cfg.resume}: " if cfg.resume else "overwrite=true: " if cfg.overwrite else ""
    return UserError(
        f"{asked}{folder} is held by a run that is running now ({holder}): stop that run first "
        "(SIGTERM saves it), or start this one in another hydra.run.dir."
    )


def _earlier_run(run_dir: Path) -> UserError:
    """The refusal of a folder whose checkpoints/ an earlier run left; no live run holds it."""
    checkpoints = run_dir / "checkpoints"
    if (checkpoints / "last.ckpt").is_file():
        return UserError(
            f"{run_dir} already holds the checkpoints of an earlier run. Resume it with "
            f"{resume_argument(run_dir)}, start a new run in another hydra.run.dir, or add overwrite=true "
            "to delete it first."
        )
    files = any(checkpoints.iterdir())
    what = "a checkpoints/ folder without last.ckpt" if files else "an empty checkpoints/ folder"
    return UserError(
        f"{run_dir} already holds {what}: the run there stopped before saving anything to resume from. "
        "Start again there with overwrite=true, or start a new run in another hydra.run.dir."
    )


def _resumed_checkpoint(cfg: DictConfig, run_dir: Path) -> Path:
    checkpoint = resume_checkpoint(cfg.resume)
    if checkpoint.parent.parent != run_dir.absolute():
        raise UserError(
            f"resume={cfg.resume} continues the run in {checkpoint.parent.parent}, not in {run_dir}: "
            "drop hydra.run.dir (and -m) when resuming."
        )
    return checkpoint


def _lock_text(folder: Path) -> str:
    try:
        return (folder / LOCK_FILE).read_text()
    except OSError:
        return ""


def _requeued(cfg: DictConfig, run_dir: Path) -> bool:
    """A requeued SLURM job (a new process: the one before it is gone) goes on in its own folder, the
    one whose run.lock names this job."""
    job = slurm_job()
    if cfg.overwrite or job is None:
        return False
    return _lock_text(run_dir).endswith(f" SLURM job {job}\n")


def _check_same_config(cfg: DictConfig, checkpoint: Path) -> None:
    saved = read_checkpoint(checkpoint, "resume").get("run_config")  # refuses a damaged one in one line
    if saved is None:
        return  # not written by train.py (a module fitted by hand): no configuration to compare
    now, then = dotted(OmegaConf.to_container(cfg, resolve=True)), dotted(run_config_now(saved))
    # Only what the run had: an option added since is at its default, which computes what the code
    # did before (new options are off by default). Paths may differ (a moved folder, a symlink), and
    # Hydra's keys (`_target_`: where the code lives); what the run computes may not.
    changed = sorted(key for key in then if now.get(key) != then[key] and key not in RESUMABLE_CHANGES)
    changed = [key for key in changed if is_setting(key)]
    epochs_then, epochs_now = then.get("trainer.max_epochs"), now.get("trainer.max_epochs")
    if _fewer_epochs(epochs_now, epochs_then):
        raise UserError(
            f"resume: trainer.max_epochs={epochs_now} is fewer than the run's {epochs_then}: a resumed run "
            "may train for more epochs, not fewer (steps saved beyond the new end would count in no "
            f"metric). Give trainer.max_epochs={epochs_then} or more."
        )
    if changed:
        differences = "; ".join(f"{key}={then.get(key)} then, {now.get(key)} now" for key in changed[:8])
        raise UserError(
            f"resume: this command configures the run differently from {checkpoint}: {differences}. "
            "Repeat the run's own overrides (its .hydra/overrides.yaml); only trainer.max_epochs may grow."
        )


def _fewer_epochs(now: int | None, then: int | None) -> bool:
    """Whether a limit of `now` epochs ends before `then` did (null and -1: no limit)."""
    if now is None or now == -1:
        return False
    return then is None or then == -1 or now < then
