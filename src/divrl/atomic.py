"""Write a directory or a file so that an interruption — an exception, `kill -9`, a power cut —
leaves either nothing (or the old one) or the complete new one: the new copy is written beside
the target, flushed to the disk (fsync), and only then renamed into place."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a directory's entries (the names renamed into it), to the disk."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then every directory: a rename made after this cannot
    survive a power cut with its contents missing."""
    for directory, _, files in os.walk(root):
        for name in files:
            fsync_path(Path(directory) / name)
        fsync_path(Path(directory))


def save_atomically(target: Path, save: Callable[[Path], object]) -> None:
    """Run `save(tmp)` into a temporary sibling directory `.<name>.*`, fsync it, then rename it to
    `target` (and fsync the parent, so the rename itself is durable). On any failure the temporary
    directory is removed and `target` is left as it was; a process killed mid-write leaves only
    the `.<name>.*` directory behind, never a partial `target`.

    If `target` already exists (another process finished first, or a re-save), it is replaced only
    after the new copy is complete.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        save(tmp)
        fsync_tree(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
        fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomically(path: Path, text: str) -> None:
    """Write a text file through a temporary sibling, an fsync and a rename: readers see the old
    file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
