"""Downloading a dataset's archive so that nothing unverified is ever left in data.dir."""

import os
import shutil
import tempfile
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lm.errors import UserError


@contextmanager
def scratch_folder(data_dir: Path, missing: str, fix: str) -> Iterator[Path]:
    """A temporary folder inside `data_dir`, removed whatever happens: only files that passed their
    checks leave it, renamed into place (`keep`) on the same file system. `missing` and `fix` word
    the error of a `data_dir` that cannot be written."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        scratch = tempfile.TemporaryDirectory(dir=data_dir)
    except OSError as error:
        raise UserError(
            f"{missing} and data.dir={data_dir} is not writable ({error.strerror or error}). {fix}"
        ) from error
    with scratch:
        yield Path(scratch.name)


def fetch(url: str, archive: Path) -> None:
    """The bytes at `url` into `archive`; raises what urllib raises (OSError, HTTPException, ValueError)."""
    with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as f:
        shutil.copyfileobj(response, f)


def keep(verified: dict[str, Path], files: dict[str, Path]) -> list[Path]:
    """Rename each verified split into its place; a file that appeared there meanwhile is the user's
    and wins. Returns the files that were not replaced."""
    kept = []
    for split, path in verified.items():
        if files[split].exists():
            kept.append(files[split])
            continue
        os.replace(path, files[split])
    return kept
