"""Fixtures shared by test modules."""

import subprocess
from pathlib import Path

import pytest


class SmallDisk:
    """A small tmpfs mounted for one test (root can mount; the test unmounts it)."""

    def __init__(self, path: Path):
        self.path = path

    def fill(self) -> None:
        """Write until the filesystem refuses: what a disk filled by something else looks like."""
        with open(self.path / "filler", "wb", buffering=0) as handle:
            try:
                while True:
                    handle.write(b"\0" * (1 << 16))
            except OSError:
                pass

    def free(self) -> None:
        (self.path / "filler").unlink(missing_ok=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs, unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], check=True)
    try:
        yield SmallDisk(mount)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)
