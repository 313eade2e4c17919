"""Flushing to disk before a rename publishes a folder (checkpoints, generated datasets).

A rename is atomic, but without these a crash right after it can leave the new name
pointing at files whose data never reached the disk."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(folder: str | Path) -> None:
    """Flush `folder`'s entries (creations, renames) to disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | Path) -> None:
    """Flush every file and folder under `folder` to disk."""
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(dirpath)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `path` whole or not at all: a reader never sees half a file, a crash leaves the old one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)
