"""One replay shard's state: ring storage + sampler + rate limiter (+ hindsight relabeling), and its
snapshots.

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
from sacfleet.replay_server.rate_limiter import RateLimited, RateLimiter
from sacfleet.replay_server.samplers import PrioritizedSampler, UniformSampler
from sacfleet.replay_server.storage import RingStorage


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
                 her: tuple | None = None):
        """`her`: (strategy, k, compute_reward) to relabel sampled goal-env transitions, or None."""
        if sampler not in ("uniform", "prioritized"):
            raise ValueError(f"sampler must be 'uniform' or 'prioritized', got {sampler!r}")
        if her is not None and not spec.obs_keys:
            raise ValueError("hindsight relabeling needs Dict observations with achieved and desired goals")
        self.spec = spec
        self.storage = RingStorage(spec, capacity, prioritized=sampler == "prioritized",
                                   max_memory_fraction=max_memory_fraction)
        rng = np.random.default_rng(seed)
        self.sampler = (PrioritizedSampler(capacity, rng, priority_alpha, priority_beta, priority_eps)
                        if sampler == "prioritized" else UniformSampler(rng))
        self.limiter = limiter
        self.her = (HindsightRelabeler(capacity, *her, rng=np.random.default_rng([seed, 1]))
                    if her is not None else None)

    @property
    def size(self) -> int:
        return self.storage.size

    def insert(self, batch: Mapping[str, np.ndarray]) -> int:
        n = self.spec.validate(batch)
        verdict = self.limiter.check_insert(n)
        if not verdict.ok:
            raise RateLimited(verdict)
        slots = self.storage.insert(batch)
        self.sampler.on_insert(slots)
        if self.her is not None:
            self.her.on_insert(slots, {name: array[n - slots.size:] for name, array in batch.items()})
        self.limiter.record_insert(n)
        return n

    def insert_encoded(self, payload: bytes) -> int:
        """Decode a chunk from the wire and insert it; raises CodecError and stores nothing if invalid."""
        return self.insert(decode_chunk(payload, self.spec))

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
        """Counters only (the measured ratio follows from them and the limiter's min_size_to_sample)."""
        return {"size": self.size, "inserts": self.limiter.inserts, "samples": self.limiter.samples,
                "her_sampled": self.her.sampled if self.her else 0,
                "her_relabeled": self.her.relabeled if self.her else 0}

    def snapshot(self) -> bytes:
        arrays, meta = self.storage.state_dict()
        arrays.update({f"sampler/{k}": v for k, v in self.sampler.state_dict().items()})
        meta = {**meta, **{f"limiter/{k}": v for k, v in self.limiter.state_dict().items()},
                "obs_dim": self.spec.obs_dim, "act_dim": self.spec.act_dim, "obs_keys": self._keys_text(),
                "sampler": "prioritized" if self.sampler.prioritized else "uniform"}
        return encode_replay(arrays, meta)

    def restore(self, payload: bytes) -> None:
        """Replace the contents with a snapshot's; raises (CodecError, ValueError) and keeps the
        current contents if the snapshot does not fit this table."""
        arrays, meta = decode_replay(payload)
        sampler = "prioritized" if self.sampler.prioritized else "uniform"
        saved = (meta.get("obs_dim"), meta.get("act_dim"), meta.get("obs_keys", ""), meta.get("sampler"))
        if saved != (self.spec.obs_dim, self.spec.act_dim, self._keys_text(), sampler):
            raise ValueError(f"snapshot is for obs_dim={saved[0]}, act_dim={saved[1]}, obs_keys={saved[2]!r}, "
                             f"sampler={saved[3]}; this table has {self.spec.obs_dim}, {self.spec.act_dim}, "
                             f"{self._keys_text()!r}, {sampler}")
        required = [f"data/{name}" for name in self.spec.fields()] + ["keys"]
        required += [f"sampler/{name}" for name in self.sampler.state_dict()]
        missing = [name for name in required if name not in arrays]
        missing += [name for name in ("inserted", "limiter/inserts", "limiter/samples") if name not in meta]
        if missing:
            raise ValueError(f"snapshot is missing {missing}")
        leaves = arrays.get("sampler/leaves")
        if leaves is not None and leaves.shape != (self.storage.capacity,):
            raise ValueError(f"snapshot priorities have shape {leaves.shape}, expected ({self.storage.capacity},)")
        self.storage.load_state_dict(arrays, meta)
        self.sampler.load_state_dict({k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("sampler/")},
                                     self.storage.size)
        self.limiter.load_state_dict({"inserts": meta["limiter/inserts"], "samples": meta["limiter/samples"]})
        if self.her is not None:
            n, data = self.storage.size, self.storage.data
            self.her.index.rebuild(self.storage.keys[:n], data["episode"][:n],
                                   data["terminated"][:n] | data["truncated"][:n])

    def _keys_text(self) -> str:
        return ",".join(f"{key}:{width}" for key, width in self.spec.obs_keys)
