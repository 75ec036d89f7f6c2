"""One replay shard as a service: a ReplayTable behind wire-level calls that never block.

The fleet wraps `ReplayShard` in a Ray actor (see `sacfleet.driver.fleet`); the class itself is plain
Python, so it is tested and benchmarked without Ray. A call the rate limiter does not allow now
returns {"ok": False, "retry_after": seconds, "reason": ...} and stores or samples nothing.
"""

from __future__ import annotations

import math
import time

import numpy as np

from sacfleet.common.config import Config
from sacfleet.common.process import ProcessIdentity, restarted_by_ray
from sacfleet.common.transitions import TransitionSpec
from sacfleet.replay_server.her import env_goal_functions
from sacfleet.replay_server.rate_limiter import RateLimited, RateLimiter, Verdict
from sacfleet.replay_server.storage import keep_freed_memory
from sacfleet.replay_server.table import ReplayTable


SNAPSHOT_STALL_S = 60.0  # a snapshot with no call for this long was abandoned by its driver


def make_table(cfg: Config, spec: TransitionSpec, shard: int, insert_size: int, sample_size: int,
               goal_functions=None) -> ReplayTable:
    """Shard `shard` of cfg.replay.num_shards: capacity and the sampling threshold are split evenly,
    and the limiter's error buffer is sized for the largest insert and sample requests. With
    replay.her on, sampled goals are relabeled, and rewards and terminations recomputed by
    `goal_functions` (compute_reward, compute_terminated; by default the env's own)."""
    shards = cfg.replay.num_shards
    min_size = math.ceil(max(cfg.train.learning_starts, cfg.learner.batch_size) / shards)
    her = None
    if cfg.replay.her != "off":
        her = (cfg.replay.her, cfg.replay.her_k, *(goal_functions or env_goal_functions(cfg.env)))
    limiter = RateLimiter.for_requests(cfg.replay.samples_per_insert, min_size, insert_size, sample_size,
                                       cfg.replay.error_buffer)
    return ReplayTable(
        spec, cfg.replay.capacity // shards, limiter, sampler=cfg.replay.sampler,
        seed=cfg.train.seed * 1000 + shard, priority_alpha=cfg.replay.priority_alpha,
        priority_beta=cfg.replay.priority_beta, priority_eps=cfg.replay.priority_eps,
        max_memory_fraction=cfg.replay.max_memory_fraction / shards, her=her, n_step=cfg.replay.n_step,
        gamma=cfg.learner.gamma)


def fleet_request_sizes(cfg: Config) -> tuple[int, int]:
    """(largest insert, largest sample) a fleet sends to one shard, in transitions."""
    return (cfg.actors.chunk_length * cfg.actors.envs_per_actor,
            cfg.learner.prefetch_batches * cfg.learner.batch_size)


def _refused(verdict: Verdict) -> dict:
    return {"ok": False, "retry_after": verdict.retry_after, "reason": verdict.reason}


class ReplayShard(ProcessIdentity):
    def __init__(self, cfg: Config, spec: TransitionSpec, shard: int):
        keep_freed_memory()  # the process serves samples: reuse their memory rather than map it anew
        self.spec = spec
        self.shard = shard
        insert_size, sample_size = fleet_request_sizes(cfg)
        self.table = make_table(cfg, self.spec, shard, insert_size, sample_size)
        self.restored_size = 0
        # A process Ray restarted after a crash holds nothing: it refuses inserts and samples until
        # the driver has restored its snapshot (or said there is none).
        self.awaiting_restore = restarted_by_ray()
        self.frozen_since: float | None = None  # a snapshot is being taken

    def insert(self, payload: bytes) -> dict:
        """Store one encoded chunk; the table decodes and checks it, and raises CodecError (storing
        nothing) for a malformed one. Returns ok=False while inserts wait (a restore, a snapshot) or
        the rate limiter holds them back."""
        held = self._held()
        if held:
            return {"ok": False, "retry_after": 0.05, "reason": held}
        try:
            return {"ok": True, "inserted": self.table.insert_encoded(payload)}
        except RateLimited as exc:
            return _refused(exc.verdict)

    def sample(self, max_batches: int, batch_size: int) -> dict:
        """Up to `max_batches` batches of `batch_size`, as many as the limiter allows now (at least one)."""
        if self.awaiting_restore:
            return {"ok": False, "retry_after": 0.1, "reason": f"replay shard {self.shard} restarted and waits for "
                                                             f"its snapshot"}
        limiter = self.table.limiter
        verdict = limiter.check_sample(batch_size)
        if not verdict.ok:
            return _refused(verdict)
        k = max_batches
        while k > 1 and not limiter.check_sample(k * batch_size).ok:
            k -= 1
        batch = self.table.sample(k, batch_size)
        return {"ok": True, "shard": self.shard, "data": batch.data, "keys": batch.keys, "weights": batch.weights}

    def _held(self) -> str:
        """Why inserts wait now, or ''."""
        if self.awaiting_restore:
            return f"replay shard {self.shard} restarted and waits for its snapshot"
        if self.frozen_since is not None:
            if time.monotonic() - self.frozen_since < SNAPSHOT_STALL_S:
                return f"replay shard {self.shard} is taking a snapshot"
            # The snapshot was abandoned (its driver is gone or gave up): serve again, and let the next
            # snapshot take every segment, since this one may not have saved the ones it began.
            self.table.mark_dirty(range(len(self.table.dirty)))
            self.frozen_since = None
        return ""

    def update_priorities(self, keys: np.ndarray, priorities: np.ndarray) -> int:
        return self.table.update_priorities(keys, priorities)

    def stats(self) -> dict:
        return {**self.table.stats(), "shard": self.shard, "awaiting_restore": self.awaiting_restore,
                "capacity": self.table.storage.capacity, "restored_size": self.restored_size}

    # -- snapshots, one segment per call: the driver writes each to a file before asking for the next

    def snapshot_begin(self) -> dict:
        """Start a snapshot (see ReplayTable.begin_snapshot); inserts are refused until snapshot_end()
        so that the segments match the header's counters. Sampling goes on."""
        self.frozen_since = time.monotonic()
        return self.table.begin_snapshot()

    def snapshot_segment(self, segment: int) -> bytes:
        self.frozen_since = time.monotonic()
        return self.table.snapshot_segment(segment)

    def snapshot_end(self, unsaved=()) -> None:
        """Inserts resume; `unsaved` segments (a failed snapshot) count as changed again."""
        self.table.mark_dirty(unsaved)
        self.frozen_since = None

    def restore_begin(self, header: bytes) -> None:
        self.table.begin_restore(header)

    def restore_segment(self, payload: bytes) -> None:
        try:
            self.table.restore_segment(payload)
        except BaseException:
            self.table.abort_restore()
            raise

    def restore_end(self) -> dict:
        """Serve again with the restored contents; returns the shard's statistics."""
        self.table.end_restore()
        self.restored_size = self.table.size
        self.awaiting_restore = False
        return self.stats()

    def serve_empty(self) -> dict:
        """Serve again without contents (a restarted shard that had no snapshot yet)."""
        self.awaiting_restore = False
        return self.stats()
