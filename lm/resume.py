"""Which run folder a run writes to, and whether it may: new, resumed, or deliberately overwritten."""

import logging
import shutil
from pathlib import Path

import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from lm.errors import UserError

log = logging.getLogger(__name__)

# May differ between a run and its resumption: how to resume, and how long to train.
RESUMABLE_CHANGES = {"resume", "overwrite", "trainer.max_epochs"}
PATH_KEYS = {"dir", "cache_dir", "url", "dirpath", "save_dir", "default_root_dir"}


def resume_checkpoint(resume: str) -> Path:
    """`resume=` names a run folder (its checkpoints/last.ckpt) or a checkpoint in its checkpoints/."""
    path = Path(resume).expanduser().absolute()  # not resolve(): Hydra keeps symlinked paths as given
    checkpoint = path / "checkpoints" / "last.ckpt" if path.is_dir() else path
    if not checkpoint.is_file() or checkpoint.parent.name != "checkpoints":
        raise UserError(
            f"resume={resume}: no {checkpoint} in a run's checkpoints/ folder. Give a run folder "
            "(outputs/<date>/<time>) that holds checkpoints/last.ckpt, or one of its checkpoints/*.ckpt."
        )
    return checkpoint


def resumed_run_folder(resume: str | None, new_folder: str) -> str:
    """The run folder: a resumed run's own, else `new_folder` (conf/hydra/default.yaml). A bad
    `resume=` falls back to `new_folder`, where `prepare_run_folder` reports it as one line."""
    try:
        return str(resume_checkpoint(resume).parent.parent) if resume else new_folder
    except UserError:
        return new_folder


def prepare_run_folder(cfg: DictConfig, run_dir: Path) -> Path | None:
    """The checkpoint to resume from, if any, after checking that the run folder may be used.

    A folder that already holds checkpoints belongs to an earlier run: it is resumed
    (`resume=`, or Lightning's own resumption of a requeued SLURM job), replaced only when asked
    (`overwrite=true`), or left alone.
    """
    if cfg.resume:
        checkpoint = resume_checkpoint(cfg.resume)
        if checkpoint.parent.parent != run_dir.absolute():
            raise UserError(
                f"resume={cfg.resume} continues the run in {checkpoint.parent.parent}, not in {run_dir}: "
                "drop hydra.run.dir (and -m) when resuming."
            )
        _check_same_config(cfg, checkpoint)
        return checkpoint
    hpc_checkpoints = list(run_dir.glob("hpc_ckpt_*.ckpt"))
    if hpc_checkpoints and SLURMEnvironment.detect() and not cfg.overwrite:
        return None  # a requeued SLURM job: Lightning resumes from its hpc checkpoint itself
    if rank_zero_only.rank != 0:
        return None
    checkpoints = run_dir / "checkpoints"
    if cfg.overwrite and checkpoints.exists():
        for earlier in (checkpoints, run_dir / "tensorboard", run_dir / "metrics.json", *hpc_checkpoints):
            if earlier.is_dir():
                shutil.rmtree(earlier)
            elif earlier.exists():
                earlier.unlink()
            log.warning("overwrite=true: deleted %s", earlier)
    try:  # created here, at once: of two runs started in the same second, the second one stops
        checkpoints.mkdir(parents=True)
    except FileExistsError:
        what = (
            "the checkpoints of an earlier run"
            if any(checkpoints.iterdir())
            else ("an empty checkpoints/ folder (a run that stopped before saving, or one running now)")
        )
        raise UserError(
            f"{run_dir} already holds {what}. Resume it with resume={run_dir}, start a new run in "
            "another hydra.run.dir, or add overwrite=true to delete it first."
        ) from None
    return None


def _check_same_config(cfg: DictConfig, checkpoint: Path) -> None:
    try:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=False).get("run_config")
    except Exception as error:
        raise UserError(
            f"resume: {checkpoint} cannot be read ({type(error).__name__}: {error}); it may be truncated. "
            "Resume from another checkpoint of the run (resume=<run folder>/checkpoints/<file>.ckpt)."
        ) from error
    if saved is None:
        return  # saved before checkpoints carried their configuration
    now, then = _flat(OmegaConf.to_container(cfg, resolve=True)), _flat(saved)
    changed = sorted(key for key in now.keys() | then.keys() if now.get(key) != then.get(key))
    # Paths may differ (a moved folder, a symlink); what the run computes may not.
    changed = [k for k in changed if k not in RESUMABLE_CHANGES and k.rsplit(".", 1)[-1] not in PATH_KEYS]
    if changed:
        differences = "; ".join(f"{key}={then.get(key)} then, {now.get(key)} now" for key in changed[:8])
        raise UserError(
            f"resume: this command configures the run differently from {checkpoint}: {differences}. "
            "Repeat the run's own overrides (its .hydra/overrides.yaml); only trainer.max_epochs may change."
        )


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
