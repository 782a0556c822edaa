"""How the Trainer writes and reads checkpoint files: whole or not at all, and only when intact
(docs/troubleshooting.md, "Checkpoints on disk"; what a checkpoint holds is lm/training/checkpoint.py's).

Lightning's own TorchCheckpointIO writes through an fsspec transaction: a temporary file in $TMPDIR,
moved into place when complete. Across file systems that move is a copy, which a full disk cuts short
under the checkpoint's real name, and the temporary file, the model's full size, stays in $TMPDIR.
Here a checkpoint is written beside its final name, synced, and renamed over it only when whole (a
rename within one folder is atomic): a kill or a full disk leaves the previous file as it was.
"""

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from torch.utils.serialization import config as serialization_config

from lm.errors import UserError
from lm.training.checkpoint_file import read_checkpoint
from lm.training.continuation import resume_argument

log = logging.getLogger(__name__)

PARTIAL_PATTERN = ".*.partial-*"  # what a write that a kill cut short leaves behind (partial_path)


def partial_path(path: Path) -> Path:
    """Where `path` is written until it is whole: beside it, hidden, named after the writing process."""
    return path.with_name(f".{path.name}.partial-{os.getpid()}")


class WholeCheckpointIO(TorchCheckpointIO):
    """The CheckpointIO plugin of every Trainer the project builds (lm/training/trainer.py).

    Saving (rank 0, as Lightning's strategies call it) writes a partial file in the checkpoint's own
    folder, with torch's CRC-32 of every record, syncs it and renames it into place; when the folder
    cannot take it (full disk, quota, read-only), the partial file is removed and one line says so.
    Loading (resume, the final test of the best checkpoint) checks the CRC-32s and unpickles tensors
    and plain values only, onto the CPU, whatever Lightning asks (`read_checkpoint`).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} writes local files only: it takes no storage_options.")
        path = Path(path)
        partial = partial_path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(partial, "wb") as file, serialization_config.patch({"save.compute_crc32": True}):
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, path)
            _sync_folder(path.parent)  # the rename itself survives a power loss
        except BaseException as error:  # a full disk, or a kill or Ctrl-C mid-write: no partial file stays
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)
            disk_error = _os_error(error) if isinstance(error, OSError | RuntimeError) else None
            if disk_error is None:  # torch could not serialise something, or an interruption
                raise
            log.debug("writing %s failed", path, exc_info=error)
            raise _not_written(path, disk_error) from None

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict:
        return read_checkpoint(Path(path), "ckpt_path")


def _os_error(error: BaseException | None) -> OSError | None:
    """The OSError behind `error`: torch reports a write that failed in its file object as a
    RuntimeError ("unexpected pos ..."), raised while handling the OSError."""
    while error is not None and not isinstance(error, OSError):
        error = error.__cause__ or error.__context__
    return error


def _sync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _not_written(path: Path, error: OSError) -> UserError:
    """One line: the folder, why, that the checkpoints already there are untouched, and what to do."""
    folder = path.parent
    if folder.name != "checkpoints":  # ddp_spawn's launcher gets the trained weights through $TMPDIR
        return UserError(
            f"{folder} could not take {path.name} ({error.strerror or error}), the trained weights handed "
            "from the workers to the launching process: nothing of it was left there, and the run's "
            "checkpoints are intact. Free space there (or point TMPDIR at a folder with room), then go on "
            "with resume=<the run folder>."
        )
    saved = [checkpoint for checkpoint in folder.glob("*.ckpt") if checkpoint.is_file()]
    last_good = max(saved, key=lambda checkpoint: checkpoint.stat().st_mtime, default=None)
    if last_good is None:
        kept, then = "no checkpoint had been saved there yet", "start the run again with overwrite=true"
    else:
        kept, then = (
            f"the last good checkpoint, {last_good}, is intact",
            f"go on with {resume_argument(folder.parent)}",
        )
    return UserError(
        f"{folder} could not take {path.name} ({error.strerror or error}): nothing of it was left there, "
        f"and {kept}. Free space there (or make it writable), then {then}."
    )
