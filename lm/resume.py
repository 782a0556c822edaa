"""Which run folder a run writes to, and whether it may: new, resumed, or deliberately overwritten."""

import logging
import shutil
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from lm.errors import UserError

log = logging.getLogger(__name__)

# May differ between a run and its resumption: how to resume, and how long to train.
RESUMABLE_CHANGES = {"resume", "overwrite", "trainer.max_epochs"}


def resume_checkpoint(resume: str) -> Path:
    """`resume=` names a run folder (its checkpoints/last.ckpt) or a checkpoint file."""
    path = Path(resume).expanduser()
    checkpoint = path / "checkpoints" / "last.ckpt" if path.is_dir() else path
    if not checkpoint.is_file():
        raise UserError(
            f"resume={resume}: no {checkpoint}. Give a run folder (outputs/<date>/<time>) that holds "
            "checkpoints/last.ckpt, or a .ckpt file."
        )
    return checkpoint.resolve()


def resumed_run_folder(resume: str | None, new_folder: str) -> str:
    """The run folder: a resumed run's own, else `new_folder` (conf/hydra/default.yaml)."""
    return str(resume_checkpoint(resume).parent.parent) if resume else new_folder


def prepare_run_folder(cfg: DictConfig, run_dir: Path) -> Path | None:
    """The checkpoint to resume from, if any, after checking that the run folder may be used.

    A folder that already holds checkpoints belongs to an earlier run: it is resumed
    (`resume=`), replaced only when asked (`overwrite=true`), or left alone.
    """
    if cfg.resume:
        checkpoint = resume_checkpoint(cfg.resume)
        _check_same_config(cfg, checkpoint)
        return checkpoint
    if rank_zero_only.rank != 0:
        return None
    checkpoints = run_dir / "checkpoints"
    if cfg.overwrite and checkpoints.exists():
        for earlier in (checkpoints, run_dir / "tensorboard", run_dir / "metrics.json"):
            if earlier.is_dir():
                shutil.rmtree(earlier)
            elif earlier.exists():
                earlier.unlink()
            log.warning("overwrite=true: deleted %s", earlier)
    try:  # created here, at once: of two runs started in the same second, the second one stops
        checkpoints.mkdir(parents=True)
    except FileExistsError:
        raise UserError(
            f"{run_dir} already holds the checkpoints of an earlier run. Resume it with resume={run_dir}, "
            "start a new run in another hydra.run.dir, or add overwrite=true to delete them first."
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
    changed = [key for key in changed if key not in RESUMABLE_CHANGES]
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
