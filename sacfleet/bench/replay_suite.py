"""The replay suite: insert and sample transitions/s for capacities 1e4 to 1e6, uniform and
prioritized, directly on a shard's table and through the Ray shard API (encoded chunks in,
multi-batch samples out), with HalfCheetah-sized transitions."""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

from sacfleet.bench import Record, ray_session
from sacfleet.common.codec import encode_chunk
from sacfleet.common.transitions import TransitionSpec

SPEC = TransitionSpec(obs_dim=17, act_dim=6)
CAPACITIES = (10_000, 100_000, 1_000_000)
SAMPLERS = ("uniform", "prioritized")
CHUNK = 1_000            # transitions per insert: 100 env steps of 10 envs
BATCH, BATCHES = 256, 32  # one multi-batch sample request (the learner asks for learner.prefetch_batches)
IN_FLIGHT = 2  # sample requests kept in flight through Ray, so the shard gathers while the client decodes


def random_chunk(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    chunk = SPEC.empty(n)
    for name in ("obs", "next_obs", "action", "reward"):
        chunk[name][...] = rng.standard_normal(chunk[name].shape).clip(-1, 1)
    return chunk


def _config(capacity: int, sampler: str):
    from sacfleet.common.config import load_config

    # A limiter that never holds back: this suite measures the storage, not the ratio.
    return load_config("halfcheetah", [f"replay.capacity={capacity}", f"replay.sampler={sampler}",
                                       "replay.samples_per_insert=1", "replay.error_buffer=1e15",
                                       "train.learning_starts=0"])


ROUNDS = 3  # timing windows per figure; the best is kept, as this machine's timings vary by +-20%


def _timed(step: Callable[[], int], seconds: float) -> float:
    """Items per second of `step` (which returns items done): the best of ROUNDS windows that
    together last at least `seconds`."""
    best = 0.0
    for _ in range(ROUNDS):
        done, start = 0, time.perf_counter()
        while True:
            done += step()
            elapsed = time.perf_counter() - start
            if elapsed >= seconds / ROUNDS:
                break
        best = max(best, done / elapsed)
    return best


def direct(capacity: int, sampler: str, seconds: float) -> tuple[float, float]:
    from sacfleet.replay_server.shard import ReplayShard

    shard = ReplayShard(_config(capacity, sampler), SPEC.obs_dim, SPEC.act_dim, 0)
    chunk = random_chunk(CHUNK)
    insert_rate = _timed(lambda: shard.table.insert(chunk), seconds)
    while shard.table.size < capacity:  # sample from a full buffer
        shard.table.insert(chunk)
    sample_rate = _timed(lambda: shard.table.sample(BATCHES, BATCH).data["reward"].size, seconds)
    return insert_rate, sample_rate


def through_ray(capacity: int, sampler: str, seconds: float) -> tuple[float, float]:
    import ray

    from sacfleet.replay_server.shard import ReplayShard

    shard = ray.remote(ReplayShard).options(num_cpus=0.1).remote(_config(capacity, sampler), SPEC.obs_dim,
                                                                  SPEC.act_dim, 0)
    try:
        ray.get(shard.ping.remote())  # allocated, so that start-up is not timed as inserts
        payload = encode_chunk(random_chunk(CHUNK), SPEC)
        ref = ray.put(payload)

        def insert() -> int:  # two in flight, as an actor keeps them
            return sum(r["ok"] * CHUNK for r in ray.get([shard.insert.remote(ref), shard.insert.remote(ref)]))

        insert_rate = _timed(insert, seconds)
        while ray.get(shard.stats.remote())["size"] < capacity:
            ray.get([shard.insert.remote(ref) for _ in range(20)])

        pending = [shard.sample.remote(BATCHES, BATCH) for _ in range(IN_FLIGHT)]

        def sample() -> int:
            out = ray.get(pending.pop(0))
            pending.append(shard.sample.remote(BATCHES, BATCH))
            return out["data"]["reward"].size if out["ok"] else 0

        rate = _timed(sample, seconds)
        ray.get(pending)
        return insert_rate, rate
    finally:
        ray.kill(shard)


def run(seconds: float = 2.0, capacities: Sequence[int] = CAPACITIES, samplers: Sequence[str] = SAMPLERS,
        echo: Callable[[str], None] = print, **_) -> list[Record]:
    records = []
    with ray_session(2):
        for path, measure in (("direct", direct), ("ray", through_ray)):
            for sampler in samplers:
                sampled = {}
                for capacity in capacities:
                    inserts, samples = measure(capacity, sampler, seconds / 2)
                    name = f"{path} {sampler} capacity {capacity:.0e}"
                    echo(f"replay {name}: insert {inserts:,.0f}/s, sample {samples:,.0f}/s transitions")
                    records += [Record(suite="replay", name=name, metric="insert_per_s", value=inserts,
                                       unit="transitions/s", device="cpu", batch_size=CHUNK),
                                Record(suite="replay", name=name, metric="sample_per_s", value=samples,
                                       unit="transitions/s", device="cpu", batch_size=BATCH * BATCHES)]
                    sampled[capacity] = samples
                # Flat in capacity means this ratio is near 1.
                small, large = min(capacities), max(capacities)
                if large > small:
                    ratio = sampled[large] / sampled[small]
                    echo(f"replay {path} {sampler}: sampling at capacity {large:.0e} is {ratio:.2f}x that at {small:.0e}")
                    records.append(Record(suite="replay", name=f"{path} {sampler} {large:.0e} vs {small:.0e}",
                                          metric="sample_rate_ratio", value=ratio, unit="ratio", device="cpu",
                                          batch_size=BATCH * BATCHES))
    return records
