"""Deterministic evaluation: the policy's mean action on episodes seeded apart from training."""

from __future__ import annotations

import numpy as np

from sacfleet.common.config import EnvConfig
from sacfleet.common.envs import STREAM_EVAL, env_seeds, make_vector_env
from sacfleet.learner.networks import Actor

MAX_PARALLEL_EPISODES = 20


def evaluate(policy: Actor, env_cfg: EnvConfig, episodes: int, seed: int) -> np.ndarray:
    """Returns of `episodes` deterministic episodes; episode i always uses the same env seed."""
    seeds = env_seeds(seed, STREAM_EVAL, 0, episodes)
    returns = []
    for start in range(0, episodes, MAX_PARALLEL_EPISODES):
        group = seeds[start:start + MAX_PARALLEL_EPISODES]
        envs = make_vector_env(env_cfg, len(group))
        try:
            obs, _ = envs.reset(seed=group)
            total = np.zeros(len(group))
            running = np.ones(len(group), dtype=bool)
            while running.any():
                obs, reward, terminated, truncated, _ = envs.step(policy.act(obs, deterministic=True))
                total += np.where(running, reward, 0.0)
                running &= ~(terminated | truncated)
            returns.extend(total.tolist())
        finally:
            envs.close()
    return np.asarray(returns)
