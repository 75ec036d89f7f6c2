"""One replay shard's state: ring storage + sampler + rate limiter (+ hindsight relabeling), and its
incremental snapshots.

Operations never block; one the limiter does not allow now raises RateLimited with how long
to wait. Every insert is validated in full before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from sacfleet.common.codec import decode_chunk, decode_replay, encode_replay
from sacfleet.common.transitions import TransitionSpec
from sacfleet.replay_server.her import HindsightRelabeler
from sacfleet.replay_server.n_step import NStepIndex
from sacfleet.replay_server.rate_limiter import RateLimited, RateLimiter
from sacfleet.replay_server.samplers import PrioritizedSampler, UniformSampler
from sacfleet.replay_server.storage import RingStorage

SEGMENT_SLOTS = 1 << 15  # slots per snapshot segment: 6 MB of HalfCheetah transitions


@dataclass
class SampleBatch:
    """`num_batches` batches packed along a leading axis: data[field] is [k, batch_size, ...]."""

    data: dict[str, np.ndarray]
    keys: np.ndarray  # [k, batch_size] global insertion numbers, for priority updates
    weights: np.ndarray | None  # [k, batch_size] importance weights; None for uniform sampling


class ReplayTable:
    def __init__(self, spec: TransitionSpec, capacity: int, limiter: RateLimiter, *,
                 sampler: str = "uniform", seed: int = 0, priority_alpha: float = 0.6,
                 priority_beta: float = 0.4, priority_eps: float = 1e-6, max_memory_fraction: float = 0.8,
                 her: tuple | None = None, n_step: int = 1, gamma: float = 0.99,
                 segment_slots: int = SEGMENT_SLOTS):
        """`her`: (strategy, k, compute_reward, compute_terminated) to relabel sampled goal-env transitions,
        or None.
        `n_step` > 1: sampled transitions become n-step ones discounted by `gamma` (replay.n_step)."""
        if sampler not in ("uniform", "prioritized"):
            raise ValueError(f"sampler must be 'uniform' or 'prioritized', got {sampler!r}")
        if her is not None and not spec.obs_keys:
            raise ValueError("hindsight relabeling needs Dict observations with achieved and desired goals")
        if her is not None and n_step > 1:
            raise ValueError("hindsight relabeling cannot be combined with n-step returns (replay.n_step > 1)")
        self.spec = spec
        self.storage = RingStorage(spec, capacity, prioritized=sampler == "prioritized",
                                   max_memory_fraction=max_memory_fraction)
        rng = np.random.default_rng(seed)
        self.sampler = (PrioritizedSampler(capacity, rng, priority_alpha, priority_beta, priority_eps)
                        if sampler == "prioritized" else UniformSampler(rng))
        self.limiter = limiter
        self.her = (HindsightRelabeler(capacity, *her, rng=np.random.default_rng([seed, 1]))
                    if her is not None else None)
        self.n_step = NStepIndex(capacity, n_step, gamma) if n_step > 1 else None
        self.segment_slots = int(segment_slots)
        self.dirty = np.zeros(-(-capacity // self.segment_slots), dtype=bool)  # segments changed since a snapshot
        self._restoring: dict | None = None
        # Mean policy version of the newest chunk a learned policy made: with the learner's update
        # count this gives the policy lag.
        self.recent_policy_version = -1.0

    @property
    def size(self) -> int:
        return self.storage.size

    def insert(self, batch: Mapping[str, np.ndarray]) -> int:
        """Check `batch` against the schema (InvalidTransitions says why not) and the rate limiter
        (RateLimited), then store it; returns how many transitions it held."""
        return self._insert(batch, self.spec.validate(batch))

    def insert_encoded(self, payload: bytes) -> int:
        """Decode a chunk from the wire, checking it against the schema as it is decoded (CodecError
        says why not), then as insert(): nothing is stored unless it is whole and valid."""
        batch = decode_chunk(payload, self.spec)
        return self._insert(batch, len(batch["reward"]))

    def _insert(self, batch: Mapping[str, np.ndarray], n: int) -> int:
        verdict = self.limiter.check_insert(n)
        if not verdict.ok:
            raise RateLimited(verdict)
        if self._restoring is not None:
            raise ValueError("cannot insert while a snapshot is being restored")
        slots = self.storage.insert(batch)
        self.dirty[slots // self.segment_slots] = True
        self.sampler.on_insert(slots)
        if self.her is not None:
            self.her.on_insert(slots, {name: array[n - slots.size:] for name, array in batch.items()})
        if self.n_step is not None:
            written = slice(n - slots.size, n)
            self.n_step.on_insert(slots, self.storage.keys[slots], batch["episode"][written],
                                  batch["terminated"][written] | batch["truncated"][written], self.storage.keys)
        self.limiter.record_insert(n)
        versions = batch["policy_version"]
        learned = versions[versions >= 0]
        if learned.size:
            self.recent_policy_version = float(learned.mean())
        return n

    def sample(self, num_batches: int, batch_size: int) -> SampleBatch:
        n = num_batches * batch_size
        verdict = self.limiter.check_sample(n)
        if not verdict.ok:
            raise RateLimited(verdict)
        slots, weights = self.sampler.sample(num_batches, batch_size, self.storage.size)
        self.limiter.record_sample(n)
        flat = slots.reshape(-1)
        data = self.storage.gather(flat)
        if self.her is not None:
            self.her.relabel(flat, data, self.storage.data)
        if self.n_step is not None:
            self.n_step.returns(flat, data, self.storage.data, tuple(self.spec.obs_fields("next_obs")))
        data = self.spec.learner_view(data)
        return SampleBatch(
            data={name: array.reshape(*slots.shape, *array.shape[1:]) for name, array in data.items()},
            keys=np.take(self.storage.keys, slots), weights=weights)

    def update_priorities(self, keys: np.ndarray, priorities: np.ndarray) -> int:
        """Set priorities of sampled transitions; ones overwritten since sampling are skipped.
        Returns how many were updated."""
        keys = np.asarray(keys, dtype=np.int64).reshape(-1)
        priorities = np.asarray(priorities, dtype=np.float64).reshape(-1)
        if keys.shape != priorities.shape:
            raise ValueError(f"{keys.size} keys but {priorities.size} priorities")
        slots = keys % self.storage.capacity
        fresh = self.storage.keys[slots] == keys
        self.sampler.update(slots[fresh], priorities[fresh])
        return int(fresh.sum())

    def stats(self) -> dict:
        """Counters, and the limiter's settings the measured ratio and its slack follow from
        (driver.report.replay_section)."""
        return {"size": self.size, "inserts": self.limiter.inserts, "samples": self.limiter.samples,
                "min_size_to_sample": self.limiter.min_size_to_sample, "error_buffer": self.limiter.error_buffer,
                "her_sampled": self.her.sampled if self.her else 0,
                "her_relabeled": self.her.relabeled if self.her else 0,
                "recent_policy_version": self.recent_policy_version}

    # -- snapshots: a header (counters, sampler state) and fixed-size segments of slots. Only segments
    # written since the last snapshot are taken again, and each is produced and restored on its own,
    # so a snapshot never needs a second copy of the buffer.

    def begin_snapshot(self) -> dict:
        """Start a snapshot of the contents as they are now: {"header": bytes, "dirty": segments
        changed since the last snapshot, "num_segments", "inserts", "size"}. Those segments count as
        saved from here on; a caller that fails to save them calls mark_dirty(). Nothing may be
        inserted until their snapshot_segment() calls are done (a shard refuses inserts meanwhile)."""
        arrays = {f"sampler/{k}": v for k, v in self.sampler.state_dict().items()}
        meta = {"inserted": self.storage.inserted, "capacity": self.storage.capacity,
                "segment_slots": self.segment_slots,
                **{f"limiter/{k}": v for k, v in self.limiter.state_dict().items()}, **self._layout()}
        num_segments = -(-self.size // self.segment_slots)
        dirty = [int(j) for j in np.flatnonzero(self.dirty[:num_segments])]
        self.dirty[:] = False
        return {"header": encode_replay(arrays, meta), "dirty": dirty, "num_segments": num_segments,
                "inserts": self.limiter.inserts, "size": self.size}

    def snapshot_segment(self, segment: int) -> bytes:
        lo = segment * self.segment_slots
        hi = min(lo + self.segment_slots, self.size)
        if not 0 <= lo < hi:
            raise ValueError(f"segment {segment} holds no transitions (size {self.size})")
        return encode_replay(self.storage.rows(lo, hi), {"segment": segment, "start": lo})

    def mark_dirty(self, segments) -> None:
        self.dirty[list(segments)] = True

    def restore(self, header: bytes, segments) -> None:
        """Fill this empty table from a snapshot's header and its segments (an iterable of bytes, read
        one at a time). Raises (CodecError, ValueError) naming what does not fit; the table is then
        empty again. Refuses a table that holds transitions: a restore never mixes two buffers."""
        self.begin_restore(header)
        try:
            for payload in segments:
                self.restore_segment(payload)
            self.end_restore()
        except BaseException:
            self.abort_restore()
            raise

    def begin_restore(self, header: bytes) -> None:
        if self.size or self._restoring is not None:
            raise ValueError(f"restore needs an empty table; this one holds {self.size} transitions")
        arrays, meta = decode_replay(header)
        saved = {key: meta.get(key) for key in self._layout()}
        if saved != self._layout():
            raise ValueError(f"snapshot is for {_describe(saved)}; this table has {_describe(self._layout())}")
        missing = [name for name in ("inserted", "capacity", "segment_slots", "limiter/inserts", "limiter/samples")
                   if name not in meta]
        missing += [f"sampler/{name}" for name in self.sampler.state_dict() if f"sampler/{name}" not in arrays]
        if missing:
            raise ValueError(f"snapshot is missing {missing}")
        if meta["capacity"] != self.storage.capacity or meta["segment_slots"] != self.segment_slots:
            raise ValueError(f"snapshot of a shard with capacity {meta['capacity']} in segments of "
                             f"{meta['segment_slots']}; this one has {self.storage.capacity} in {self.segment_slots}")
        size = min(int(meta["inserted"]), self.storage.capacity)
        self._restoring = {"meta": meta, "arrays": arrays, "size": size,
                           "missing": set(range(-(-size // self.segment_slots)))}

    def restore_segment(self, payload: bytes) -> None:
        pending = self._restoring
        if pending is None:
            raise ValueError("restore_segment() before begin_restore()")
        arrays, meta = decode_replay(payload)
        segment, lo = meta.get("segment"), meta.get("start")
        if segment not in pending["missing"] or lo != segment * self.segment_slots:
            raise ValueError(f"snapshot segment {segment} (at slot {lo}) is not one this snapshot still needs")
        rows = self.storage.load_rows(lo, arrays)
        if rows != min(self.segment_slots, pending["size"] - lo):
            raise ValueError(f"snapshot segment {segment} holds {rows} rows, expected "
                             f"{min(self.segment_slots, pending['size'] - lo)}")
        pending["missing"].discard(segment)

    def end_restore(self) -> None:
        pending, self._restoring = self._restoring, None
        if pending is None:
            raise ValueError("end_restore() before begin_restore()")
        if pending["missing"]:
            self.storage.clear()
            raise ValueError(f"snapshot segments {sorted(pending['missing'])} are missing")
        meta, arrays = pending["meta"], pending["arrays"]
        try:
            self.storage.set_inserted(int(meta["inserted"]))
            self.sampler.load_state_dict({k.split("/", 1)[1]: v for k, v in arrays.items()
                                          if k.startswith("sampler/")}, self.size)
        except BaseException:
            self.storage.clear()
            raise
        self.limiter.load_state_dict({"inserts": meta["limiter/inserts"], "samples": meta["limiter/samples"]})
        self.dirty[:] = False  # the contents are those of the snapshot just read
        n, data = self.storage.size, self.storage.data
        if self.her is not None:
            self.her.index.rebuild(self.storage.keys[:n], data["episode"][:n],
                                   data["terminated"][:n] | data["truncated"][:n])
        if self.n_step is not None:
            self.n_step.rebuild(np.arange(n), self.storage.keys[:n], data["episode"][:n],
                                data["terminated"][:n] | data["truncated"][:n], self.storage.keys)

    def abort_restore(self) -> None:
        self._restoring = None
        self.storage.clear()

    def _layout(self) -> dict:
        return {"obs_dim": self.spec.obs_dim, "act_dim": self.spec.act_dim,
                "obs_keys": ",".join(f"{key}:{width}" for key, width in self.spec.obs_keys),
                "sampler": "prioritized" if self.sampler.prioritized else "uniform"}


def _describe(layout: dict) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in layout.items())


def snapshot_parts(table: ReplayTable) -> tuple[bytes, list[bytes]]:
    """A whole snapshot held in memory (tests and tools; runs stream segments to files instead)."""
    start = table.begin_snapshot()
    return start["header"], [table.snapshot_segment(j) for j in range(start["num_segments"])]
