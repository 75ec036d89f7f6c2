"""Rollout logic of one env actor: M envs stepped together, one batched policy forward per step,
transitions with the true next observation, and finished episodes' returns and lengths."""

from __future__ import annotations

import time
from typing import Mapping

import numpy as np

from sacfleet.actors.policy import ActingPolicy
from sacfleet.common.config import EnvConfig
from sacfleet.common.envs import STREAM_TRAIN, EnvInfo, env_seeds, make_vector_env

RANDOM_POLICY_VERSION = -1  # tags transitions from uniform random warm-up actions


class Rollout:
    def __init__(self, env_cfg: EnvConfig, env_info: EnvInfo, num_envs: int, *, seed: int, actor_index: int = 0):
        self.num_envs = num_envs
        self.envs = make_vector_env(env_cfg, num_envs)
        seeds = env_seeds(seed, STREAM_TRAIN, actor_index, num_envs + 2)
        self.obs, _ = self.envs.reset(seed=seeds[:num_envs])
        self.envs.action_space.seed(seeds[num_envs])
        self.rng = np.random.default_rng(seeds[num_envs])
        self.policy_rng = np.random.default_rng(seeds[num_envs + 1])
        self.low, self.high = env_info.action_low, env_info.action_high
        self.policy: ActingPolicy | None = None  # random actions until the first weights arrive
        self.policy_version = RANDOM_POLICY_VERSION
        self.episode_return = np.zeros(num_envs)
        self.episode_length = np.zeros(num_envs, dtype=np.int64)
        self.finished: list[tuple[float, int]] = []
        self.steps = 0  # vector steps taken
        self.seconds_env = 0.0  # time in env.step and in policy inference, for the per-stage figures
        self.seconds_inference = 0.0

    def load_weights(self, weights: Mapping[str, np.ndarray], version: int) -> None:
        self.policy = ActingPolicy(weights)
        self.policy_version = int(version)

    def step(self, random_actions: bool) -> dict[str, np.ndarray]:
        """Step every env once; return the M transitions made."""
        t0 = time.perf_counter()
        if random_actions or self.policy_version == RANDOM_POLICY_VERSION:
            action = self.rng.uniform(self.low, self.high, size=(self.num_envs, len(self.low))).astype(np.float32)
            version = RANDOM_POLICY_VERSION
        else:
            action = self.policy(self.obs, self.policy_rng)
            version = self.policy_version
        t1 = time.perf_counter()
        next_obs, reward, terminated, truncated, info = self.envs.step(action)
        self.seconds_env += time.perf_counter() - t1
        self.seconds_inference += t1 - t0
        done = terminated | truncated
        # Same-step autoreset: next_obs of a finished env already starts a new episode; the
        # transition must end at the episode's own last observation.
        true_next = next_obs.copy()
        for i in np.flatnonzero(done):
            true_next[i] = info["final_obs"][i]
        transitions = {
            "obs": self.obs.astype(np.float32, copy=False),
            "action": action,
            "reward": reward.astype(np.float32),
            "next_obs": true_next.astype(np.float32, copy=False),
            "terminated": terminated.astype(np.bool_),
            "truncated": truncated.astype(np.bool_),
            "policy_version": np.full(self.num_envs, version, dtype=np.int64),
        }
        self.episode_return += reward
        self.episode_length += 1
        for i in np.flatnonzero(done):
            self.finished.append((float(self.episode_return[i]), int(self.episode_length[i])))
            self.episode_return[i], self.episode_length[i] = 0.0, 0
        self.obs = next_obs
        self.steps += 1
        return transitions

    def pop_finished(self) -> list[tuple[float, int]]:
        """(return, length) of the episodes finished since the last call."""
        finished, self.finished = self.finished, []
        return finished

    def close(self) -> None:
        self.envs.close()
