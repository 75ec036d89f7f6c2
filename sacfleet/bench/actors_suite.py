"""The actors suite: fleet collection env steps/s for N env actors x M envs, each acting with the
policy network and pushing encoded chunks of T steps to a replay shard and pulling weights every K
steps, with no learner to hold them back; and the same rate as a fraction of the raw single-process
env rate times the cores the actors were given. Measured at the halfcheetah preset's (M, T, K), at
one env per actor with T=K=10, and at 16 envs per actor with T=32. Also what one weight pull costs
the actor and the learner's process, with nothing new and with the preset's policy bytes."""

from __future__ import annotations

import os
import time
import uuid
from typing import Callable, Sequence

from sacfleet.bench import Record, ray_session

ENV_ID = "HalfCheetah-v5"
PRESET = "halfcheetah"  # whose actor settings (envs per actor, chunk length, weight sync) are measured
# (envs per actor, chunk length, weight sync interval) measured besides the preset's: one env per
# actor at the config's defaults, and 16 envs per actor with 512-transition chunks, which amortises
# Ray's per-call cost (HalfCheetah learned less in 60k steps with it: README, "Performance").
OTHERS = ((1, 10, 10), (16, 32, 10))
ROUNDS = 3  # measurement windows per figure; the best is kept, as this machine's timings vary by +-15%


def actor_counts(cores: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to the cores, one core per actor."""
    counts, n = [], 1
    while n <= cores:
        counts.append(n)
        n *= 2
    return tuple(counts)


class StaticWeights:
    """Stands in for the learner: publishes one set of freshly initialised policy weights, so that
    actors run their policy forward pass exactly as in training."""

    def __init__(self, cfg, env_info):
        from sacfleet.common.codec import encode_weights
        from sacfleet.learner.networks import PolicyNetwork

        policy = PolicyNetwork.for_config(cfg.learner, env_info.obs_dim, env_info.act_dim, env_info.action_low,
                                          env_info.action_high)
        weights = {name: t.detach().numpy() for name, t in policy.state_dict().items()}
        self.published = (0, encode_weights(weights, 0))

    def latest_weights(self, have_version: int):
        return self.published if have_version < 0 else None

    def ping(self) -> bool:
        return True


class PublishingLearner:
    """Stands in for the fleet learner's process when actors pull weights: the real PolicyPublisher
    over a SACLearner of the preset's shapes, one snapshot published, and its process's CPU time."""

    def __init__(self, cfg, env_info):
        import torch

        from sacfleet.learner.publish import PolicyPublisher
        from sacfleet.learner.sac import SACLearner

        torch.set_num_threads(1)
        self.publisher = PolicyPublisher(SACLearner.from_config(cfg.learner, env_info, "cpu"),
                                         cfg.learner.publish_interval)
        self.publisher.snapshot()
        self.publisher.latest(-1)  # encoded once, as the first actor's pull does

    def latest_weights(self, have_version: int):
        return self.publisher.latest(have_version)

    def cpu_seconds(self) -> float:
        return time.process_time()

    def bytes_per_pull(self) -> int:
        return self.publisher.bytes_per_pull


class Puller:
    def pull(self, source, have_version: int, n: int) -> float:
        """Seconds per `latest_weights` call, n calls one after another."""
        import ray

        start = time.perf_counter()
        for _ in range(n):
            ray.get(source.latest_weights.remote(have_version))
        return (time.perf_counter() - start) / n


def weight_pull_cost(pulls: int = 1000) -> dict:
    """What one weight pull costs the puller (seconds per call) and the learner's process (CPU
    seconds per call beyond its idle use), when nothing is new and when the policy's bytes go back;
    best of ROUNDS."""
    import ray

    from sacfleet.common.config import load_config
    from sacfleet.common.envs import describe_env

    cfg = load_config(PRESET)
    source = ray.remote(PublishingLearner).options(num_cpus=0.5).remote(cfg, describe_env(cfg.env))
    puller = ray.remote(Puller).options(num_cpus=0.5).remote()
    try:
        c0 = ray.get(source.cpu_seconds.remote())
        w0 = time.perf_counter()
        time.sleep(1.0)
        idle = (ray.get(source.cpu_seconds.remote()) - c0) / (time.perf_counter() - w0)
        best = {}
        for _ in range(ROUNDS):
            for what, have in (("nothing new", 0), ("weights", -1)):
                c0, w0 = ray.get(source.cpu_seconds.remote()), time.perf_counter()
                per_call = ray.get(puller.pull.remote(source, have, pulls))
                cpu = (ray.get(source.cpu_seconds.remote()) - c0 - idle * (time.perf_counter() - w0)) / pulls
                if what not in best or per_call < best[what][0]:
                    best[what] = (per_call, max(cpu, 0.0))
        return {"best": best, "bytes": ray.get(source.bytes_per_pull.remote())}
    finally:
        ray.kill(source)
        ray.kill(puller)


def preset_settings(preset: str = PRESET) -> tuple[int, int, int]:
    from sacfleet.common.config import load_config

    a = load_config(preset).actors
    return a.envs_per_actor, a.chunk_length, a.weight_sync_interval


def settings_label(settings: tuple[int, int, int]) -> str:
    m, t, k = settings
    return f"{m} env{'s' if m > 1 else ''} T={t} K={k}"


def collection_config(env_id: str, num_actors: int, settings: tuple[int, int, int]):
    from sacfleet.common.config import load_config

    envs, chunk, sync = settings
    # A limiter that never holds actors back: nothing samples in this suite.
    return load_config(PRESET, [f"env.id={env_id}", f"actors.num={num_actors}", f"actors.envs_per_actor={envs}",
                                f"actors.chunk_length={chunk}", f"actors.weight_sync_interval={sync}",
                                "replay.capacity=200000", "replay.samples_per_insert=1", "replay.error_buffer=1e15",
                                "train.learning_starts=0"])


def collect_rate(env_id: str, num_actors: int, settings: tuple[int, int, int], seconds: float) -> dict:
    """Steady-state env steps/s of the whole fleet (after the policy weights have arrived), best of
    ROUNDS windows, and the share of the actors' time spent stepping envs, in inference and
    waiting on inserts in that window."""
    import ray

    from sacfleet.actors.env_actor import EnvActor
    from sacfleet.common.envs import describe_env
    from sacfleet.common.transitions import TransitionSpec
    from sacfleet.replay_server.shard import ReplayShard

    cfg = collection_config(env_id, num_actors, settings)
    env_info = describe_env(cfg.env)
    handles = []
    try:
        tag = uuid.uuid4().hex[:12]
        peers = {"shards": [f"bench-{tag}-shard"], "learner": f"bench-{tag}-weights"}
        shard = ray.remote(ReplayShard).options(num_cpus=0.01, name=peers["shards"][0]).remote(
            cfg, TransitionSpec.for_env(env_info), 0)
        source = ray.remote(StaticWeights).options(num_cpus=0.01, name=peers["learner"]).remote(cfg, env_info)
        handles += [shard, source]
        ray.get([shard.ping.remote(), source.ping.remote()], timeout=120)  # registered before actors look them up
        actor_cls = ray.remote(EnvActor).options(num_cpus=1, max_concurrency=2)
        actors = [actor_cls.remote(cfg, env_info, i, peers) for i in range(num_actors)]
        handles += actors
        ray.get([a.ping.remote() for a in actors + [source, shard]], timeout=120)
        runs = [a.run.remote(i) for i, a in enumerate(actors)]
        deadline = time.monotonic() + 60
        while True:  # warm up until every actor acts with the policy
            stats = ray.get([a.stats.remote() for a in actors])
            if all(s["policy_version"] >= 0 and s["steps"] > 0 for s in stats):
                break
            ended, _ = ray.wait(runs, timeout=0)
            if ended:
                ray.get(ended)  # raises the actor's error
                raise RuntimeError("actors suite: an env actor stopped during warm-up")
            if time.monotonic() > deadline:
                raise RuntimeError("actors suite: env actors did not receive the policy weights within 60 s")
            time.sleep(0.1)
        time.sleep(min(1.0, seconds / 4))
        best: dict = {"env_steps_per_s": 0.0}
        after, t1 = ray.get([a.stats.remote() for a in actors]), time.monotonic()
        for _ in range(ROUNDS):
            before, t0 = after, t1
            time.sleep(seconds)
            after, t1 = ray.get([a.stats.remote() for a in actors]), time.monotonic()
            steps = sum(a["steps"] - b["steps"] for a, b in zip(after, before))
            if steps / (t1 - t0) > best["env_steps_per_s"]:
                spent = {k: sum(a["seconds"][k] - b["seconds"][k] for a, b in zip(after, before))
                         for k in after[0]["seconds"]}
                busy = num_actors * (t1 - t0)
                best = {"env_steps_per_s": steps / (t1 - t0), **{f"{k}_share": v / busy for k, v in spent.items()}}
        for a in actors:
            a.stop.remote()
        ray.get(runs, timeout=60)
        return best
    finally:
        for handle in handles:
            ray.kill(handle)


def run(seconds: float = 2.0, env_id: str = ENV_ID, settings: Sequence[tuple[int, int, int]] | None = None,
        actors: Sequence[int] | None = None, echo: Callable[[str], None] = print, **_) -> list[Record]:
    from sacfleet.bench.env_suite import env_steps_per_s

    cores = os.cpu_count() or 1
    actors = actors or actor_counts(cores)
    preset = preset_settings()
    settings = settings or list(dict.fromkeys([preset, *OTHERS]))
    raw = max(env_steps_per_s(env_id, seconds) for _ in range(ROUNDS))
    echo(f"actors: raw {env_id} {raw:,.0f} steps/s in one process (best of {ROUNDS})")
    records = [Record(suite="actors", name=f"{env_id} raw", metric="env_steps_per_s", value=raw, unit="steps/s",
                      device="cpu", actors=0)]
    # One logical CPU per actor plus one for the shard and the weight source, which use little.
    with ray_session(max(actors) + 1):
        for setting in settings:
            for n in actors:
                figures = collect_rate(env_id, n, setting, seconds)
                rate = figures["env_steps_per_s"]
                # Cores given to actors: one each, and never more than the machine has.
                fraction = rate / (raw * min(n, cores))
                name = f"{env_id} x {settings_label(setting)}{f' ({PRESET} preset)' if setting == preset else ''}"
                echo(f"actors {n} actor(s) {name}: {rate:,.0f} steps/s = {fraction:.2f} x raw x {min(n, cores)} "
                     f"core(s) | env {figures['env_share']:.0%}, inference {figures['inference_share']:.0%}, "
                     f"insert wait {figures['insert_wait_share']:.0%} of actor time")
                common = dict(suite="actors", name=name, device="cpu", batch_size=setting[0], actors=n)
                records += [Record(metric="env_steps_per_s", value=rate, unit="steps/s", **common),
                            Record(metric="fraction_of_raw_per_core", value=fraction, unit="ratio", **common)]
                records += [Record(metric=f"{stage}_share", value=figures[f"{stage}_share"],
                                   unit="fraction of actor time", **common)
                            for stage in ("env", "inference", "insert_wait")]
        pull = weight_pull_cost(pulls=max(20, round(500 * seconds)))  # 1,000 at the default 2 s
        common = dict(suite="actors", name=f"weight pull ({PRESET} policy, {pull['bytes']:,} bytes)", device="cpu")
        for what, (per_call, cpu) in pull["best"].items():
            echo(f"actors weight pull, {what}: {per_call * 1e6:,.0f} us per pull at the actor, {cpu * 1e6:,.0f} us of "
                 f"the learner process's CPU")
            records += [Record(metric=f"us_per_pull: {what}", value=per_call * 1e6, unit="us", **common),
                        Record(metric=f"learner_cpu_us_per_pull: {what}", value=cpu * 1e6, unit="us", **common)]
    return records
