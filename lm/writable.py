"""Whether a folder can take new files: asked before a long job (tokenising a corpus, scoring a file)
that would only then find out."""

import os
from pathlib import Path


def why_unwritable(folder: Path) -> str | None:
    """Why new files cannot go into `folder` (made first if missing), or None; nothing is created.
    The nearest part of it that exists must be a folder that takes new files."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None
