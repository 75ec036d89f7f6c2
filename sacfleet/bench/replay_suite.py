"""The replay suite: insert and sample transitions/s for capacities 1e4 to 1e6, uniform and
prioritized, directly on a shard's table and through the Ray shard API (encoded chunks in,
multi-batch samples out), with HalfCheetah-sized transitions; and FetchReach's Dict layout against a
flat layout of the same width, with and without hindsight relabeling; and what incremental replay
snapshots cost at 1e6 transitions."""

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

    shard = ReplayShard(_config(capacity, sampler), SPEC, 0)
    chunk = random_chunk(CHUNK)
    insert_rate = _timed(lambda: shard.table.insert(chunk), seconds)
    while shard.table.size < capacity:  # sample from a full buffer
        shard.table.insert(chunk)
    sample_rate = _timed(lambda: shard.table.sample(BATCHES, BATCH).data["reward"].size, seconds)
    return insert_rate, sample_rate


def through_ray(capacity: int, sampler: str, seconds: float) -> tuple[float, float]:
    import ray

    from sacfleet.replay_server.shard import ReplayShard

    shard = ray.remote(ReplayShard).options(num_cpus=0.1).remote(_config(capacity, sampler), SPEC, 0)
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


GOAL_SPEC = TransitionSpec(16, 4, (("achieved_goal", 3), ("desired_goal", 3), ("observation", 10)))
GOAL_CAPACITY, EPISODE = 100_000, 50


def goal_layouts(seconds: float, capacity: int = GOAL_CAPACITY) -> dict[str, tuple[float, float]]:
    """(insert, sample) transitions/s on a table of FetchReach's shapes: flat (one 16-wide obs), flat with
    3-step returns (replay.n_step), Dict (each key its own field, concatenated for the learner), and
    Dict with HER `future`, k = 4."""
    from sacfleet.replay_server.rate_limiter import RateLimiter
    from sacfleet.replay_server.table import ReplayTable

    def reward(achieved, desired, info):
        return -(np.linalg.norm(achieved - desired, axis=-1) > 0.05).astype(np.float32)

    def never_terminated(achieved, desired, info):  # Fetch's compute_terminated
        return False

    figures = {}
    for name, spec, her, n_step in (("flat", TransitionSpec(16, 4), None, 1),
                                    ("flat + n-step 3", TransitionSpec(16, 4), None, 3),
                                    ("dict", GOAL_SPEC, None, 1),
                                    ("dict + her future", GOAL_SPEC, ("future", 4, reward, never_terminated), 1)):
        limiter = RateLimiter(samples_per_insert=1.0, min_size_to_sample=1, error_buffer=1e15)
        table = ReplayTable(spec, capacity, limiter, her=her, n_step=n_step)
        rng = np.random.default_rng(0)
        chunk = spec.empty(CHUNK)
        for field, array in chunk.items():
            if array.dtype == np.float32:
                array[...] = rng.standard_normal(array.shape)
        # 10 envs' 50-step episodes, interleaved step by step as an actor's chunks are.
        chunk["episode"][:] = np.arange(CHUNK) % 10 + 10 * (np.arange(CHUNK) // (10 * EPISODE))
        chunk["truncated"][:] = (np.arange(CHUNK) // 10) % EPISODE == EPISODE - 1

        def insert() -> int:
            chunk["episode"] += 1000  # new episode ids for each chunk's episodes
            return table.insert(chunk)

        inserts = _timed(insert, seconds)
        while table.size < capacity:
            insert()
        samples = _timed(lambda: table.sample(BATCHES, BATCH).data["reward"].size, seconds)
        figures[name] = (inserts, samples)
    return figures


SNAPSHOT_CAPACITY = 1_000_000
SNAPSHOT_INCREMENTS = (10_000, 100_000)  # new transitions between two checkpoints: ~6 s and ~1 min of a GPU fleet


def snapshot_costs(capacity: int = SNAPSHOT_CAPACITY, increments: Sequence[int] = SNAPSHOT_INCREMENTS,
                   echo: Callable[[str], None] = print) -> dict[str, float]:
    """Seconds to checkpoint a full Ray shard of HalfCheetah transitions into a checkpoint directory, as
    the driver does (one segment per call, each written before the next is asked for): the first,
    whole snapshot, then incremental ones after `increments` new transitions; and to restore it."""
    import tempfile

    import ray

    from sacfleet.driver.checkpointing import FleetCheckpointer
    from sacfleet.replay_server.shard import ReplayShard

    cfg = _config(capacity, "uniform")
    shard = ray.remote(ReplayShard).options(num_cpus=0.1).remote(cfg, SPEC, 0)
    restored = ray.remote(ReplayShard).options(num_cpus=0.1).remote(cfg, SPEC, 0)
    payload = encode_chunk(random_chunk(CHUNK), SPEC)

    def insert(n: int) -> None:
        ray.get([shard.insert.remote(payload) for _ in range(n // CHUNK)])

    figures: dict[str, float] = {}
    try:
        insert(capacity)
        with tempfile.TemporaryDirectory(prefix="sacfleet-snap-") as directory:
            checkpointer = FleetCheckpointer(cfg, directory)
            for label, new in (("full", 0), *((f"after {n:.0e} new", n) for n in increments)):
                insert(new)
                checkpointer.writer.next_generation()
                start = time.perf_counter()
                checkpointer.snapshot_shard(0, shard)
                figures[f"snapshot {label} s"] = time.perf_counter() - start
                echo(f"replay snapshot of {capacity:.0e} transitions, {label}: {figures[f'snapshot {label} s']:.2f} s")
            entry = checkpointer.writer.entries[0]
            figures["snapshot bytes"] = float(entry["header"]["bytes"] + sum(r["bytes"] for r in entry["segments"]))
            figures["segment bytes"] = float(max(r["bytes"] for r in entry["segments"]))
            start = time.perf_counter()
            checkpointer.restore_shard(0, restored)
            figures["restore s"] = time.perf_counter() - start
            echo(f"replay restore of {capacity:.0e} transitions: {figures['restore s']:.2f} s "
                 f"({figures['snapshot bytes'] / 2**20:,.0f} MB in segments of "
                 f"{figures['segment bytes'] / 2**20:.1f} MB)")
    finally:
        for handle in (shard, restored):
            ray.kill(handle)
    return figures


def run(seconds: float = 2.0, capacities: Sequence[int] = CAPACITIES, samplers: Sequence[str] = SAMPLERS,
        echo: Callable[[str], None] = print, snapshot_capacity: int = SNAPSHOT_CAPACITY,
        goal_capacity: int = GOAL_CAPACITY, **_) -> list[Record]:
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
                    echo(f"replay {path} {sampler}: sampling at capacity {large:.0e} is {ratio:.2f}x that at "
                         f"{small:.0e}")
                    records.append(Record(suite="replay", name=f"{path} {sampler} {large:.0e} vs {small:.0e}",
                                          metric="sample_rate_ratio", value=ratio, unit="ratio", device="cpu",
                                          batch_size=BATCH * BATCHES))
        costs = snapshot_costs(snapshot_capacity, [n for n in SNAPSHOT_INCREMENTS if n < snapshot_capacity],
                               echo=echo)
        full = costs["snapshot full s"]
        for name, value in costs.items():
            if name.endswith(" s"):
                records.append(Record(suite="replay", name=f"{name[:-2]} {snapshot_capacity:.0e}", metric="seconds",
                                      value=value, unit="s", device="cpu"))
            if name.startswith("snapshot after"):
                records.append(Record(suite="replay", name=f"{name[:-2]} vs full", metric="time_ratio",
                                      value=value / full, unit="ratio", device="cpu"))
        records.append(Record(suite="replay", name=f"snapshot {snapshot_capacity:.0e}", metric="bytes",
                              value=costs["snapshot bytes"], unit="bytes", device="cpu"))
    layouts = goal_layouts(seconds / 2, goal_capacity)
    flat_insert, flat_sample = layouts["flat"]
    for name, (inserts, samples) in layouts.items():
        echo(f"replay FetchReach shapes, {name}: insert {inserts:,.0f}/s ({inserts / flat_insert:.2f}x flat), "
             f"sample {samples:,.0f}/s ({samples / flat_sample:.2f}x flat) transitions, capacity {goal_capacity:.0e}")
        records += [Record(suite="replay", name=f"goal shapes {name}", metric="insert_per_s", value=inserts,
                           unit="transitions/s", device="cpu", batch_size=CHUNK),
                    Record(suite="replay", name=f"goal shapes {name}", metric="sample_per_s", value=samples,
                           unit="transitions/s", device="cpu", batch_size=BATCH * BATCHES),
                    Record(suite="replay", name=f"goal shapes {name} vs flat", metric="sample_rate_ratio",
                           value=samples / flat_sample, unit="ratio", device="cpu", batch_size=BATCH * BATCHES)]
    return records
