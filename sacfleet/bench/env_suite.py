"""The env suite: raw env steps/s of one env in one process with random actions, the ceiling a
single core puts on collection."""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

from sacfleet.bench import Record

ENV_IDS = ("sacfleet/PointMass-v0", "sacfleet/PointMassGoal-v0", "Pendulum-v1", "HalfCheetah-v5", "Hopper-v5",
           "Walker2d-v5", "Ant-v5", "Humanoid-v5", "Pusher-v5", "FetchReach-v4", "FetchPush-v4")


def env_steps_per_s(env_id: str, seconds: float, seed: int = 0) -> float:
    from sacfleet.common.config import EnvConfig
    from sacfleet.common.envs import make_env, register_envs

    register_envs()
    env = make_env(EnvConfig(id=env_id))
    try:
        env.reset(seed=seed)
        rng = np.random.default_rng(seed)
        low, high = env.action_space.low, env.action_space.high
        # Actions drawn ahead, so that the figure is the env's and not the sampler's.
        actions = rng.uniform(low, high, size=(1024, low.size)).astype(env.action_space.dtype)
        steps, start = 0, time.perf_counter()
        while True:
            for action in actions:
                _, _, terminated, truncated, _ = env.step(action)
                if terminated or truncated:
                    env.reset()
            steps += len(actions)
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return steps / elapsed
    finally:
        env.close()


def run(seconds: float = 2.0, env_ids: Sequence[str] = ENV_IDS, echo: Callable[[str], None] = print,
        env_id: str | None = None, **_) -> list[Record]:
    env_ids = (env_id,) if env_id else env_ids
    records = []
    for env_id in env_ids:
        value = env_steps_per_s(env_id, seconds)
        echo(f"env {env_id}: {value:,.0f} steps/s")
        records.append(Record(suite="env", name=env_id, metric="env_steps_per_s", value=value, unit="steps/s",
                              device="cpu"))
    return records
