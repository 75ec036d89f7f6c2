"""Deterministic evaluation: the policy's mean action on episodes seeded apart from training, with
the success rate for envs that report `is_success`."""

from __future__ import annotations

import numpy as np

from sacfleet.common.config import EnvConfig
from sacfleet.common.envs import STREAM_EVAL, env_seeds, episode_successes, flatten_obs, make_vector_env, obs_names
from sacfleet.learner.networks import PolicyNetwork

MAX_PARALLEL_EPISODES = 20


def evaluate(policy: PolicyNetwork, env_cfg: EnvConfig, episodes: int, seed: int) -> tuple[np.ndarray, float | None]:
    """Returns of `episodes` deterministic episodes (episode i always uses the same env seed), and the
    fraction that ended in success (None if the env does not report `is_success`)."""
    seeds = env_seeds(seed, STREAM_EVAL, 0, episodes)
    returns, successes = [], []
    for start in range(0, episodes, MAX_PARALLEL_EPISODES):
        group = seeds[start:start + MAX_PARALLEL_EPISODES]
        envs = make_vector_env(env_cfg, len(group))
        try:
            obs, _ = envs.reset(seed=group)
            total = np.zeros(len(group))
            running = np.ones(len(group), dtype=bool)
            names = obs_names(envs.single_observation_space)
            while running.any():
                action = policy.act(flatten_obs(obs, names), deterministic=True)
                obs, reward, terminated, truncated, info = envs.step(action)
                total += np.where(running, reward, 0.0)
                ended = running & (terminated | truncated)
                if ended.any():
                    successes.extend(s for s in episode_successes(info, ended) if s is not None)
                running &= ~(terminated | truncated)
            returns.extend(total.tolist())
        finally:
            envs.close()
    return np.asarray(returns), (float(np.mean(successes)) if successes else None)
