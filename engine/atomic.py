"""Atomic file writes: write a temp file beside the target, fsync, rename over it.

A reader sees either the old file or the complete new one, never a half-written file, and a
crash mid-write leaves at most a ``*.tmp`` sibling that the next successful write does not
depend on. Used for model files, state files, logits and harness records.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """``open(path, mode)`` that only replaces ``path`` once the block finished without error."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f
