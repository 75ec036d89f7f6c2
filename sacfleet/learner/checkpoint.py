"""Atomic learner checkpoints: torch tensors and plain values only, loaded with weights_only=True
so that opening a checkpoint cannot run code."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from sacfleet.common.io import atomic_write_bytes

CHECKPOINT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or from an incompatible version."""


def save_checkpoint(path: Path, learner_state: dict, extra: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save({"version": CHECKPOINT_VERSION, "learner": learner_state, **extra}, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():  # a checkpoints directory or a whole run directory
        path = path / "checkpoint.pt" if (path / "checkpoint.pt").is_file() else path / "checkpoints" / "checkpoint.pt"
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} is not a sacfleet checkpoint of version {CHECKPOINT_VERSION}")
    return state


def replay_snapshot_path(directory: Path, shard: int) -> Path:
    return Path(directory) / f"replay_shard{shard}.msgpack"


def write_run_checkpoint(directory: Path, learner_state: dict, extra: dict[str, Any],
                         replay_snapshots: list[bytes] | None = None) -> None:
    """Replay snapshots first, then checkpoint.pt, each atomically: checkpoint.pt is what a resume
    starts from, so it is replaced last."""
    for shard, payload in enumerate(replay_snapshots or []):
        atomic_write_bytes(replay_snapshot_path(directory, shard), payload)
    save_checkpoint(Path(directory) / "checkpoint.pt", learner_state, extra)


def read_replay_snapshots(directory: Path, num_shards: int) -> list[bytes] | None:
    """The replay snapshots of a run's checkpoint directory, or None when it has none; refuses a
    set that does not match `num_shards`."""
    found = sorted(Path(directory).glob("replay_shard*.msgpack"))
    if not found:
        return None
    if len(found) != num_shards:
        raise CheckpointError(f"{directory} holds replay snapshots of {len(found)} shards, but "
                              f"replay.num_shards={num_shards}; resume with the same number of shards")
    return [replay_snapshot_path(directory, shard).read_bytes() for shard in range(num_shards)]


def kept_checkpoint_note(directory: Path) -> str:
    """What a failed run leaves to resume from, for its error message."""
    path = Path(directory) / "checkpoint.pt"
    if not path.is_file():
        return "no checkpoint had been written (checkpoint.interval=0 saves one only at the end)"
    try:
        state = load_checkpoint(path)
    except CheckpointError as exc:
        return f"the checkpoint left in {directory} cannot be read ({exc})"
    return (f"the last good checkpoint ({state['learner']['updates']:,} updates, {state['env_steps']:,} env steps) "
            f"is kept in {directory}")
