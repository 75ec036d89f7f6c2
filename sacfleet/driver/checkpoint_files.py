"""Checkpoint sets on disk: each set's file (the learner's state, the run's counters and the manifest of
its replay snapshot files) is written atomically after the files it lists; the newest `checkpoint.keep`
sets are kept (checkpoint.pt, checkpoint.1.pt, ...), and a reader takes the newest that reads back
whole. Torch tensors and plain values only, loaded with weights_only=True so that opening a checkpoint
cannot run code."""

from __future__ import annotations

import io
import math
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from sacfleet.common.config import to_dict
from sacfleet.common.io import atomic_write_bytes
from sacfleet.driver.errors import RunRefused
from sacfleet.replay_server.snapshot_files import SnapshotFileError, remove_unlisted, verify

CHECKPOINT_VERSION = 2  # 2: replay snapshots in segments listed by a manifest (1: one file per shard)
READABLE_VERSIONS = (1, 2)  # a version-1 checkpoint resumes with its learner state and an empty replay
ZIP_MAGIC = b"PK\x03\x04"  # how every file torch.save writes begins
CHECKPOINT_FILE = "checkpoint.pt"  # the newest set's; older kept ones are checkpoint.1.pt, checkpoint.2.pt, ...
DAMAGED_SUFFIX = ".damaged"  # a set that did not read back, set aside by the run that skipped it


class CheckpointError(RunRefused):
    """A checkpoint is missing, unreadable, or from an incompatible version."""


def save_checkpoint(path: Path, learner_state: dict, extra: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save({"version": CHECKPOINT_VERSION, "learner": learner_state, **extra}, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())


def set_file(age: int) -> str:
    """The file of the kept set `age` places behind the newest."""
    return CHECKPOINT_FILE if age == 0 else f"checkpoint.{age}.pt"


def _age(path: Path) -> int | None:
    if path.name == CHECKPOINT_FILE:
        return 0
    middle = path.name[len("checkpoint."):-len(".pt")]
    return int(middle) if path.name.startswith("checkpoint.") and path.suffix == ".pt" and middle.isdigit() else None


def kept_files(directory: Path) -> list[Path]:
    """The checkpoint sets' files in a checkpoints directory, newest first."""
    aged = [(age, path) for path in Path(directory).glob("checkpoint*.pt") if (age := _age(path)) is not None]
    return [path for _, path in sorted(aged)]


def checkpoints_dir(path: Path) -> Path:
    """A run directory's checkpoints/, or `path` itself when it is one."""
    path = Path(path)
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def read_checkpoint_file(path: Path) -> dict[str, Any]:
    """One set's file, whole: torch.save's zip archive with every record's CRC-32 checked (torch.load
    alone reads a flipped bit in a tensor without complaint), then loaded."""
    path = Path(path)
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
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        if bad is not None:
            raise ValueError(f"the CRC-32 of its record {bad} does not match")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is damaged (cut short or corrupted): {exc}") from None
    if not isinstance(state, dict) or state.get("version") not in READABLE_VERSIONS:
        versions = " or ".join(map(str, READABLE_VERSIONS))
        raise CheckpointError(f"{path} is not a sacfleet checkpoint of version {versions}")
    return state


@dataclass
class FoundCheckpoint:
    """The newest set that read back whole, and why each newer one did not."""

    path: Path
    state: dict
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def note(self) -> str:
        """What was skipped and what is used instead; empty when the newest set was whole."""
        if not self.skipped:
            return ""
        reasons = "; ".join(reason for _, reason in self.skipped)
        return (f"skipped {len(self.skipped)} newer checkpoint set{'s' if len(self.skipped) > 1 else ''} ({reasons}); "
                f"using {self.path.name} ({self.state['learner']['updates']:,} updates, "
                f"{self.state.get('env_steps', 0):,} env steps)")


def newest_checkpoint(path: Path, check: Callable[[Path, dict], None] | None = None) -> FoundCheckpoint:
    """The newest kept set of a run or checkpoints directory that reads back whole and passes `check`
    (which raises CheckpointError, e.g. for replay files that do not match). Raises CheckpointError
    when there is none, naming what is wrong with each."""
    directory = checkpoints_dir(path)
    files = kept_files(directory)
    if not files:
        raise CheckpointError(f"no checkpoint at {directory / CHECKPOINT_FILE}")
    skipped = []
    for file in files:
        try:
            state = read_checkpoint_file(file)
            if check is not None:
                check(directory, state)
            return FoundCheckpoint(file, state, skipped)
        except CheckpointError as exc:
            skipped.append((file, str(exc)))
    if len(skipped) == 1:
        raise CheckpointError(skipped[0][1])
    raise CheckpointError(f"none of the {len(skipped)} checkpoint sets in {directory} reads back whole: "
                          + "; ".join(reason for _, reason in skipped))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint file, or the newest whole set of a run or checkpoints directory."""
    path = Path(path)
    return newest_checkpoint(path).state if path.is_dir() else read_checkpoint_file(path)


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


class CheckpointSets:
    """Commits a run's checkpoint sets into its checkpoints directory and keeps the newest `keep`.
    A set's replay files are written first (snapshot_files.SnapshotWriter, named by generation so
    that no kept file is overwritten); committing it moves each older set's file one place back
    (checkpoint.pt -> checkpoint.1.pt, ...; a rename, atomic), writes its checkpoint.pt atomically,
    then deletes the sets past `keep` and the replay files no kept set lists. A crash at any point
    leaves every kept set whole (at worst without checkpoint.pt for a moment: readers take the next).
    `kept_replay`: the replay manifests of the sets already kept (a resumed run's), newest first;
    `damaged`: files of sets a resume skipped, set aside as NAME.damaged so they do not count."""

    def __init__(self, directory: Path, keep: int, kept_replay: Sequence[dict | None] = (),
                 damaged: Sequence[Path] = ()):
        self.directory, self.keep = Path(directory), max(1, int(keep))
        for path in damaged:
            os.replace(path, path.with_name(path.name + DAMAGED_SUFFIX))
        self.replays: list[dict | None] = list(kept_replay)[:self.keep]  # of the kept sets, newest first

    def commit(self, learner_state: dict, extra: dict[str, Any], replay: dict | None = None) -> None:
        """Raises OSError (common.io.WriteFailed) when the set's file cannot be written; nothing kept moved."""
        # Staged first, so that a write that fails (a full disk) leaves the kept sets where they were.
        staged = self.directory / f".{CHECKPOINT_FILE}.staged"
        save_checkpoint(staged, learner_state, {**extra, "replay": replay})
        for path in reversed(kept_files(self.directory)):
            age = _age(path)
            if age + 1 < self.keep:
                os.replace(path, self.directory / set_file(age + 1))
        os.replace(staged, self.directory / CHECKPOINT_FILE)
        for path in kept_files(self.directory):
            if _age(path) >= self.keep:
                path.unlink(missing_ok=True)
        self.replays = [replay, *self.replays][:self.keep]
        remove_unlisted(self.directory, self.replays)

    def amend(self, learner_state: dict, extra: dict[str, Any], replay: dict | None = None) -> None:
        """Rewrite the newest set's file (e.g. with the final evaluation), atomically."""
        save_checkpoint(self.directory / CHECKPOINT_FILE, learner_state, {**extra, "replay": replay})

    def older_entries(self, shard: int) -> list[dict]:
        """Shard `shard`'s snapshots in the kept sets older than the newest, newest first: what an
        in-place recovery falls back on when the newest snapshot's files do not read back."""
        return [replay["shards"][shard] for replay in self.replays[1:]
                if replay and shard < len(replay["shards"]) and replay["shards"][shard]]


class WriteFailures:
    """Checkpoint sets in a row that could not be written (a full or failing disk). Each is reported
    with what it needed and why; the previous set stays the newest and training goes on, the next
    checkpoint retrying; at `limit` in a row the caller stops the run."""

    def __init__(self, limit: int, directory: Path, echo: Callable[[str], None]):
        self.limit, self.directory, self.echo = limit, Path(directory), echo
        self.count = 0

    def attempt(self, commit: Callable[[], None], what: str = "checkpoint") -> str | None:
        """Run `commit`; returns why the run must stop, when this failure is the limit's."""
        try:
            commit()
        except OSError as exc:
            self.count += 1
            self.echo(f"{what} not written ({self.count} in a row; checkpoint.max_write_failures={self.limit}): "
                      f"{exc}; {kept_checkpoint_note(self.directory)}")
            if self.count >= self.limit:
                return f"checkpoints could not be written {self.count} times in a row: {exc}"
            return None
        self.count = 0
        return None


def check_replay_files(directory: Path, state: dict) -> None:
    """Every replay file a set's manifest lists reads back with its size and CRC-32 (a `check` for
    newest_checkpoint)."""
    if state.get("replay"):
        try:
            verify(directory, state["replay"])
        except SnapshotFileError as exc:
            raise CheckpointError(f"{exc}; resume with checkpoint.replay=false to start from an empty buffer") from None


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
    check_replay_files(directory, state)
    return manifest


def kept_checkpoint_note(directory: Path) -> str:
    """What a failed run leaves to resume from, for its error message."""
    if not kept_files(directory):
        return "no checkpoint had been written (checkpoint.interval=0 saves one only at the end)"
    try:
        found = newest_checkpoint(directory)
    except CheckpointError as exc:
        return f"the checkpoint left in {directory} cannot be read ({exc})"
    state = found.state
    return (f"the last good checkpoint ({state['learner']['updates']:,} updates, {state['env_steps']:,} env steps) "
            f"is kept in {found.path}")
