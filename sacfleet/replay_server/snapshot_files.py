"""Replay snapshots on disk, as part of a checkpoint set: per shard a header file and one file per
segment, written incrementally (only segments changed since the last snapshot) and listed, with their
sizes and CRC-32s, in a manifest that the set's checkpoint file carries. Files are named by the
generation that wrote them, so a new set never overwrites a file a kept one still needs."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Callable, Iterator, Sequence

from sacfleet.common.io import atomic_write_bytes

REPLAY_DIR = "replay"


class SnapshotFileError(RuntimeError):
    """A snapshot file is missing or is not the one the checkpoint's manifest lists."""


def _write(directory: Path, name: str, payload: bytes) -> dict:
    atomic_write_bytes(Path(directory) / name, payload)
    return {"file": name, "bytes": len(payload), "crc32": zlib.crc32(payload)}


def read_file(directory: Path, ref: dict) -> bytes:
    """The file `ref` names, checked against its size and CRC-32."""
    path = Path(directory) / ref["file"]
    try:
        payload = path.read_bytes()
    except OSError as exc:
        raise SnapshotFileError(f"replay snapshot file {path} cannot be read: {exc.strerror or exc}") from None
    if len(payload) != ref["bytes"] or zlib.crc32(payload) != ref["crc32"]:
        raise SnapshotFileError(f"replay snapshot file {path} does not belong to this checkpoint ({len(payload):,} "
                                f"bytes, CRC {zlib.crc32(payload):08x}; the checkpoint lists {ref['bytes']:,} bytes, "
                                f"CRC {ref['crc32']:08x})")
    return payload


def entry_files(entry: dict) -> list[dict]:
    return [entry["header"], *entry["segments"]]


def verify(directory: Path, manifest: dict) -> None:
    """Read every file of `manifest` once; raises SnapshotFileError naming the first that does not fit."""
    for entry in manifest["shards"]:
        for ref in entry_files(entry) if entry else []:
            read_file(directory, ref)


def read_shard(directory: Path, entry: dict) -> tuple[bytes, Iterator[bytes]]:
    """A shard's header and its segments, each read (and checked) only when the iterator reaches it."""
    return read_file(directory, entry["header"]), (read_file(directory, ref) for ref in entry["segments"])


class SnapshotWriter:
    """Writes the replay part of successive checkpoint sets into `directory` (a run's checkpoints/).
    `manifest`, the committed set a resumed run starts from, is the base the first increment builds on."""

    def __init__(self, directory: Path, num_shards: int, manifest: dict | None = None):
        self.directory = Path(directory)
        self.generation = manifest["generation"] if manifest else 0
        self.entries: list[dict | None] = list(manifest["shards"]) if manifest else [None] * num_shards

    def next_generation(self) -> int:
        self.generation += 1
        return self.generation

    def write_shard(self, shard: int, start: dict, fetch_segment: Callable[[int], bytes]) -> dict:
        """Write shard `shard`'s snapshot begun with `start` (ReplayTable.begin_snapshot's answer):
        its changed segments, fetched one at a time, then its header. The entry only replaces the
        shard's previous one once every file is written."""
        previous = self.entries[shard]
        segments = list(previous["segments"]) if previous else []
        segments = (segments + [None] * start["num_segments"])[:start["num_segments"]]
        base = f"{REPLAY_DIR}/shard{shard}"
        for j in start["dirty"]:
            segments[j] = _write(self.directory, f"{base}/seg{j:05d}-g{self.generation}.msgpack", fetch_segment(j))
        missing = [j for j, ref in enumerate(segments) if ref is None]
        if missing:  # a segment unchanged since a snapshot this writer never saw: a bug, not bad input
            raise SnapshotFileError(f"replay shard {shard}: segments {missing} were neither changed nor saved before")
        header = _write(self.directory, f"{base}/header-g{self.generation}.msgpack", start["header"])
        entry = {"header": header, "segments": segments, "inserts": int(start["inserts"]), "size": int(start["size"])}
        self.entries[shard] = entry
        return entry

    def restored(self, shard: int, entry: dict | None) -> None:
        """Shard `shard` now holds what `entry` lists (or nothing): the next increment builds on it."""
        self.entries[shard] = entry

    def manifest(self) -> dict | None:
        """The set as written so far; a shard without a snapshot yet is None in it (restored empty)."""
        if all(entry is None for entry in self.entries):
            return None
        return {"generation": self.generation, "shards": list(self.entries)}


def remove_unlisted(directory: Path, manifests: Sequence[dict | None]) -> None:
    """Delete replay snapshot files none of the kept sets' `manifests` lists (increments no kept set
    needs, and the single-file snapshots of checkpoint version 1)."""
    directory = Path(directory)
    keep = {ref["file"] for manifest in manifests if manifest for entry in manifest["shards"] if entry
            for ref in entry_files(entry)}
    for path in list((directory / REPLAY_DIR).glob("shard*/*.msgpack")) + list(directory.glob("replay_shard*.msgpack")):
        if path.relative_to(directory).as_posix() not in keep:
            path.unlink(missing_ok=True)
