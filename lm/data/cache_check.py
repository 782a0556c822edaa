"""The token cache's files: written whole, by one process at a time, and trusted only while they
are what was recorded (docs/data.md, "Large corpora").

A file is recognised by its stat signature, which costs no read. The prepared ids are also checked
in full against the checksum recorded when they were written: whenever their signature changed
or is too fresh to trust, and otherwise at the first open a day after the last full check, for
bit rot, which leaves the signature alone. A full check reads every id (sha256: 1.3 GB/s here
against blake2b's 0.75, with SHA instructions); a start between two checks reads none.
"""

import errno
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lm.errors import UserError
from lm.writable import why_unwritable

log = logging.getLogger(__name__)

# A file's stat signature is trusted only once it is this much older than the moment it was taken:
# a file system with coarse timestamps (FAT: 2 s) could otherwise hide a rewrite in the same tick.
TIMESTAMP_SLACK_NS = 3_000_000_000
# Bit rot is rare, and a full check of 100M tokens (200 MB) takes 0.2-0.5 s: once a day costs nothing.
FULL_CHECK_EVERY_NS = 24 * 3600 * 10**9
CHECKSUM = "sha256"


def signature(path: Path) -> list[int]:
    """Size, modification and status-change times (ns), inode and device of a file.

    Any write to a file moves its mtime and ctime, and ctime cannot be set back (`touch -d`,
    `cp -p` and `rsync -t` restore mtime only); a file replaced by another has a new inode. So a
    changed file never shows an old signature, except within one timestamp tick of the moment
    the signature was taken, which `settled` rules out.
    """
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev]


def settled(record: dict) -> bool:
    """Every file of `record` ({"signatures": {name: signature}, "taken_ns": when}) was last changed
    well before its signature was taken (git's "racy clean" rule): otherwise it is read again."""
    newest = max(max(mtime, ctime) for _, mtime, ctime, _, _ in record["signatures"].values())
    return newest < record["taken_ns"] - TIMESTAMP_SLACK_NS


def checksum(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, CHECKSUM).hexdigest()


def altered_ids(files: dict[str, Path], checksums: dict[str, str], verified: Path) -> list[str]:
    """The names of `files` whose content is not `checksums` (empty when all match), read in full
    only when the schedule above says; `verified` records each full check that found them intact."""
    taken_ns = time.time_ns()
    signatures = {name: signature(path) for name, path in files.items()}
    last = read_json(verified)
    if (
        last
        and last.get("signatures") == signatures
        and settled(last)
        and taken_ns - last["taken_ns"] < FULL_CHECK_EVERY_NS
    ):
        return []
    altered = [name for name, path in files.items() if checksum(path) != checksums[name]]
    if not altered:
        try:
            write_json({"signatures": signatures, "taken_ns": taken_ns}, verified)
        except OSError as error:  # a read-only cache: the next start checks in full again
            log.debug("cannot record the check of %s (%s)", verified.parent, error)
    return altered


@contextmanager
def locked(path: Path, what: str) -> Iterator[None]:
    """Held by one process at a time: one that finds it held logs that it waits for `what`.
    fcntl.flock rather than a file that exists while locked: the kernel releases it however its
    holder ends, so a killed run never leaves a stale lock behind. Raises OSError if the lock file
    cannot be made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as lock:  # open for writing: NFS takes no exclusive lock on a read-only file
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("Another process is %s; waiting for it.", what)
            started = time.perf_counter()
            fcntl.flock(lock, fcntl.LOCK_EX)
            log.info("Waited %.1f s for another process %s.", time.perf_counter() - started, what)
        yield


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(obj: object, path: Path) -> None:
    """Write to a temporary file and rename, so a killed run or a full disk never leaves half a file
    that a later start trusts."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f)
        os.replace(tmp, path)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def check_writable(cache_dir: Path) -> None:
    """The cache folder must take new files; nothing is created yet."""
    reason = why_unwritable(cache_dir)
    if reason:
        raise cache_error(cache_dir, reason)


def cache_error(cache_dir: Path, reason: str | OSError) -> UserError:
    """One line for a cache folder that cannot be written: read-only, no permission, a full disk
    (EROFS, EACCES, EPERM, ENOSPC, ...)."""
    fix = "set data.cache_dir=PATH to a folder you can write"
    if isinstance(reason, OSError):
        if reason.errno == errno.ENOSPC:
            fix = "free some space, or set data.cache_dir=PATH on another disk"
        reason = reason.strerror or str(reason)
    return UserError(f"data.cache_dir={cache_dir} cannot hold the token cache ({reason}): {fix}.")
