"""Where the tools write: their run folder, score.py's `output=`, evaluate.py's `probs_file=`. Each place
is checked before the model is loaded, so that one that cannot take the file is one line naming its
key, not a traceback after the pass; nothing is created until there is something to write."""

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from lm.errors import UserError, exit_on_user_error
from lm.writable import why_unwritable


class CheckRunFolder(Callback):
    """The tools' Hydra callback (conf/evaluate.yaml, generate.yaml, score.yaml): Hydra makes the run
    (or sweep) folder before the tool starts, and a path it cannot make would stop it with a traceback."""

    @exit_on_user_error
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_folder(Path(str(config.hydra.run.dir)), "hydra.run.dir")

    @exit_on_user_error
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_folder(Path(str(config.hydra.sweep.dir)), "hydra.sweep.dir")


def check_folder(folder: Path, key: str) -> None:
    """Refuse, naming `key`, a `folder` that cannot be made or written: its nearest part that exists
    must be a folder that takes new files."""
    reason = why_unwritable(folder)
    if reason:
        raise UserError(f"{key}={folder} cannot be written ({reason}): give {key} a folder you can write.")


def output_file(output: str, key: str, reads: Mapping[Path, str], left_out: str | None = None) -> Path:
    """The file `key=output` names, refused if it is a folder (or ends in "/"), one of the files the
    run `reads` (each with what it is: "the checkpoint"), which writing would destroy, or in a place
    that cannot be written. An earlier file there is replaced, as the tools replace the files of a
    run folder they are given again. `left_out` says what leaving `key` out does, where it does one."""
    path = Path(output).expanduser()
    advice = f"give {key} a file path in a folder you can write" + (
        f", or leave it out ({left_out})" if left_out else ""
    )
    if path.is_dir() or output.endswith(os.sep):
        raise UserError(f"{key}={output} is a folder, not a file: {advice}.")
    for read, what in reads.items():
        if path.exists() and read.exists() and path.samefile(read):
            raise UserError(f"{key}={output} is {what}, which writing would replace: {advice}.")
    reason = why_unwritable(path.parent)
    if reason:
        raise UserError(f"{key}={output} cannot be written ({reason}): {advice}.")
    return path


def write_whole(path: Path, key: str, text: str) -> None:
    """`text` into `path`, through a partial file renamed at the end, so that a full disk or a kill
    never leaves half a file, nor takes an earlier one; its folders are made if missing."""
    partial = path.with_name(path.name + ".partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(text, encoding="utf-8", newline="")
        partial.replace(path)
    except OSError as error:  # ENOSPC, EACCES, EROFS: what the check before the pass could not see
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        raise UserError(
            f"{key}={path} cannot be written ({error.strerror or error}): free some space, or give {key} "
            "a file path in a folder you can write."
        ) from None
