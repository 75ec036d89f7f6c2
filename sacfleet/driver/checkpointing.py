"""Checkpoint sets of a running fleet: the learner's state and the shards' incremental replay
snapshots, streamed one segment at a time into the run directory and committed as one unit; and
shards filled back from the newest snapshots (on resume, and when a shard is recovered)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from sacfleet.common.config import Config
from sacfleet.driver.calls import CALL_TIMEOUT
from sacfleet.driver.checkpoint_files import CheckpointSets
from sacfleet.driver.errors import FleetDiverged, FleetError, ray_cause
from sacfleet.learner.sac import LearnerDiverged
from sacfleet.replay_server.snapshot_files import SnapshotFileError, SnapshotWriter, read_shard, verify


class CheckpointSkipped(FleetError):
    """A component died or did not answer while its state was taken; the last committed set stays
    whole, and the supervisor recovers the component. `silent`: the one that did not answer within
    the call's timeout ("learner", "shard2"), when known."""

    def __init__(self, message: str, silent: str | None = None):
        super().__init__(message)
        self.silent = silent


class FleetCheckpointer:
    """`manifest` and `learner_state`: the committed set a resumed session starts from (or None);
    `kept_replay`: the replay manifests of the sets kept beside it, newest first (it included);
    `damaged`: the files of newer sets the resume skipped (checkpoint_files.CheckpointSets)."""

    def __init__(self, cfg: Config, directory: Path, manifest: dict | None = None, learner_state: dict | None = None,
                 kept_replay: Sequence[dict | None] = (), damaged: Sequence[Path] = ()):
        self.cfg = cfg
        self.directory = Path(directory)
        self.writer = SnapshotWriter(self.directory, cfg.replay.num_shards, manifest)
        self.sets = CheckpointSets(self.directory, cfg.checkpoint.keep, kept_replay or [manifest], damaged)
        self.learner_state = learner_state  # of the newest committed set: what a recovered learner restarts from
        self.committed: tuple[dict, dict, dict | None] | None = None  # (state, extra, manifest) of that set

    # -- taking a set

    def take(self, learner, shards: list, timeout: float = CALL_TIMEOUT,
             keep_dead_shards: bool = False) -> tuple[dict, list[int]]:
        """(the learner's state, each shard's inserts as its snapshot holds them). The counters saved
        with the set come from these, so a resume counts exactly what the snapshots hold. With
        `keep_dead_shards` (a run stopping on a failure) a shard that is gone keeps its last snapshot."""
        calling: str | None = "learner"
        try:
            state = ray.get(learner.state.remote(), timeout=timeout)
            calling = None
            if not self.cfg.checkpoint.replay:
                return state, [s["inserts"] for s in ray.get([h.stats.remote() for h in shards], timeout=timeout)]
            self.writer.next_generation()
            inserts = []
            for i, handle in enumerate(shards):
                calling = f"shard{i}"
                try:
                    inserts.append(self.snapshot_shard(i, handle, timeout))
                except (RayActorError, GetTimeoutError):
                    if not keep_dead_shards:
                        raise
                    entry = self.writer.entries[i]
                    inserts.append(entry["inserts"] if entry else 0)
            return state, inserts
        except RayTaskError as exc:
            if isinstance(exc.cause, LearnerDiverged):
                raise FleetDiverged(exc.cause.update, exc.cause.what, str(exc.cause)) from None
            raise FleetError(f"checkpoint failed: {ray_cause(exc)}") from None
        except RayActorError as exc:
            raise CheckpointSkipped(f"checkpoint skipped, a component is gone: {ray_cause(exc)}") from None
        except GetTimeoutError:
            who = {None: "a shard", "learner": "the learner"}.get(calling, f"replay shard {calling[5:]}")
            raise CheckpointSkipped(f"checkpoint skipped: {who} did not answer within {timeout:g} s",
                                    calling) from None

    def snapshot_shard(self, index: int, handle, timeout: float = CALL_TIMEOUT) -> int:
        """Write shard `index`'s changed segments and header (part of the generation begun by
        take()); returns the inserts its snapshot holds."""
        start = ray.get(handle.snapshot_begin.remote(), timeout=timeout)
        unsaved = start["dirty"]
        try:
            entry = self.writer.write_shard(
                index, start, lambda j: ray.get(handle.snapshot_segment.remote(j), timeout=timeout))
            unsaved = []
            return entry["inserts"]
        finally:
            handle.snapshot_end.remote(unsaved)  # inserts resume; a dead shard makes this a no-op

    def commit(self, state: dict, extra: dict) -> None:
        manifest = self.writer.manifest() if self.cfg.checkpoint.replay else None
        self.sets.commit(state, extra, manifest)
        self.learner_state, self.committed = state, (state, extra, manifest)

    def amend(self, **extra) -> None:
        """Rewrite the newest set's checkpoint.pt with `extra` changed (e.g. the final evaluation)."""
        if self.committed is not None:
            state, old, manifest = self.committed
            self.committed = (state, {**old, **extra}, manifest)
            self.sets.amend(state, self.committed[1], manifest)

    # -- filling shards

    def restore_shard(self, index: int, handle, timeout: float = CALL_TIMEOUT,
                      echo: Callable[[str], None] | None = None) -> dict:
        """Fill shard `index` (empty, or restarted after a crash) from its newest snapshot whose files
        read back whole (an older kept set's when the newest's do not: `echo` says so), one segment per
        call, and let it serve; returns its statistics."""
        entry = self.writer.entries[index]
        try:
            if entry is None:
                return ray.get(handle.serve_empty.remote(), timeout=timeout)
            entry = self._readable_entry(index, entry, echo)
            header, segments = read_shard(self.directory, entry)
            ray.get(handle.restore_begin.remote(header), timeout=timeout)
            for payload in segments:
                ray.get(handle.restore_segment.remote(payload), timeout=timeout)
            return ray.get(handle.restore_end.remote(), timeout=timeout)
        except (RayTaskError, SnapshotFileError) as exc:
            raise FleetError(f"cannot restore replay shard {index} from its snapshot: {ray_cause(exc)}") from None

    def _readable_entry(self, index: int, newest: dict, echo: Callable[[str], None] | None) -> dict:
        """The newest of shard `index`'s kept snapshots whose files all read back (checked before the
        shard sees any of it); the next increment then builds on that one."""
        failures = []
        for entry in [newest, *self.sets.older_entries(index)]:
            try:
                verify(self.directory, {"shards": [entry]})
            except SnapshotFileError as exc:
                failures.append(str(exc))
                continue
            if failures:
                self.writer.restored(index, entry)
                if echo:
                    echo(f"replay shard {index}: its newest snapshot does not read back ({failures[0]}); "
                         f"restoring an older one, of {entry['inserts']:,} inserts")
            return entry
        raise SnapshotFileError("; ".join(failures))
