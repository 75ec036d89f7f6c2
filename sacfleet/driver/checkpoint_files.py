"""The checkpoint set's files: checkpoint.pt (the learner's state, the run's counters and the manifest of
its replay snapshot files), written atomically after the files it lists. Torch tensors and plain values
only, loaded with weights_only=True so that opening a checkpoint cannot run code."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from sacfleet.common.config import to_dict
from sacfleet.common.io import atomic_write_bytes
from sacfleet.driver.errors import RunRefused
from sacfleet.replay_server.snapshot_files import SnapshotFileError, remove_unlisted, verify

CHECKPOINT_VERSION = 2  # 2: replay snapshots in segments listed by a manifest (1: one file per shard)
READABLE_VERSIONS = (1, 2)  # a version-1 checkpoint resumes with its learner state and an empty replay
ZIP_MAGIC = b"PK\x03\x04"  # how every file torch.save writes begins


class CheckpointError(RunRefused):
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
        with open(path, "rb") as handle:
            magic = handle.read(len(ZIP_MAGIC))
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    if magic != ZIP_MAGIC:  # torch.save writes a zip archive; this is some other file
        raise CheckpointError(f"{path} is not a sacfleet checkpoint (not a file torch.save wrote)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is damaged (cut short or corrupted): {exc}") from None
    if not isinstance(state, dict) or state.get("version") not in READABLE_VERSIONS:
        versions = " or ".join(map(str, READABLE_VERSIONS))
        raise CheckpointError(f"{path} is not a sacfleet checkpoint of version {versions}")
    return state


BEST_FILE = "best.pt"


class BestPolicy:
    """checkpoint.best: the policy of the best evaluation so far, kept as checkpoints/best.pt (as SB3's
    EvalCallback keeps best_model), so that a run that collapses late still leaves what it learned.
    A policy and its evaluation only, readable by `sacfleet eval`; a resume never starts from it."""

    def __init__(self, cfg, directory: Path, env_info: dict):
        self.enabled = cfg.checkpoint.best
        self.path = Path(directory) / BEST_FILE
        self.extra = {"config": to_dict(cfg), "env_info": env_info}
        self.best: dict | None = None  # {"return_mean", "env_steps", "policy_version"}
        if self.enabled and self.path.is_file():  # a resumed run's best so far
            try:
                self.best = load_checkpoint(self.path).get("best")
            except CheckpointError:
                self.best = None

    @property
    def threshold(self) -> float | None:
        """The return an evaluation must beat to replace the kept policy; None when none is kept."""
        if not self.enabled:
            return None
        return -math.inf if self.best is None else self.best["return_mean"]

    def offer(self, weights: Mapping[str, Any], version: int, mean: float, env_steps: int) -> bool:
        """Keep `weights` (the evaluated policy's state dict) if their evaluation `mean` is the best yet."""
        threshold = self.threshold
        if threshold is None or not mean > threshold:
            return False
        self.best = {"return_mean": float(mean), "env_steps": int(env_steps), "policy_version": int(version)}
        actor = {name: value.detach().to("cpu", copy=True) if isinstance(value, torch.Tensor)
                 else torch.as_tensor(np.array(value)) for name, value in weights.items()}
        save_checkpoint(self.path, {"actor": actor, "updates": int(version)},
                        {**self.extra, "env_steps": int(env_steps), "best": self.best})
        return True


def write_run_checkpoint(directory: Path, learner_state: dict, extra: dict[str, Any],
                         replay: dict | None = None) -> None:
    """Commit a checkpoint set: checkpoint.pt, written atomically after the replay snapshot files
    its `replay` manifest lists (snapshot_files.SnapshotWriter), then files no longer listed go.
    A crash at any point leaves the previous set or the new one whole."""
    save_checkpoint(Path(directory) / "checkpoint.pt", learner_state, {**extra, "replay": replay})
    remove_unlisted(directory, replay)


def replay_manifest(state: dict, directory: Path, num_shards: int) -> dict | None:
    """The replay part of a loaded checkpoint set, its files checked against the manifest; None when
    the set has none. Raises CheckpointError for a set that does not fit `num_shards` or whose
    files do not belong to it."""
    manifest = state.get("replay")
    if not manifest:
        return None
    if len(manifest["shards"]) != num_shards:
        raise CheckpointError(f"{directory} holds replay snapshots of {len(manifest['shards'])} shards, but "
                              f"replay.num_shards={num_shards}; resume with the same number of shards")
    try:
        verify(directory, manifest)
    except SnapshotFileError as exc:
        raise CheckpointError(f"{exc}; resume with checkpoint.replay=false to start from an empty buffer") from None
    return manifest


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
