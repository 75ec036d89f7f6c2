"""Crash-safe file writes: a temp file in the target's directory, fsync, then an atomic rename; a write
that fails (a full disk, a read-only or failing one) says which file, how many bytes and why."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


class WriteFailed(OSError):
    """A file could not be written; the message names it, its size, the OS error and the space left."""

    def __init__(self, path: Path, size: int, error: OSError):
        super().__init__(error.errno, f"cannot write {path} ({size:,} bytes): {error.strerror or error}"
                                      f"{free_space_note(Path(path).parent)}")
        self.path, self.size = Path(path), size

    def __str__(self) -> str:  # the message, without OSError's "[Errno 28]" in front
        return self.strerror


def free_space_note(directory: Path) -> str:
    try:
        return f"; {shutil.disk_usage(directory).free:,} bytes free there"
    except OSError:
        return ""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the whole new one. Raises
    WriteFailed, leaving the old file (and no temp file) in place, when the write fails."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        if isinstance(exc, OSError) and not isinstance(exc, WriteFailed):
            raise WriteFailed(path, len(data), exc) from None
        raise
