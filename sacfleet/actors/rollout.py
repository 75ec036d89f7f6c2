"""Rollout logic of one env actor: M envs stepped together, one batched policy forward per step,
transitions with the true next observation (each key of a Dict observation as its own field), and
finished episodes' returns, lengths and success flags."""

from __future__ import annotations

import secrets
import time
from typing import Mapping

import numpy as np

from sacfleet.actors.policy import NumpyPolicy
from sacfleet.common.config import EnvConfig
from sacfleet.common.envs import (STREAM_TRAIN, EnvInfo, env_seeds, episode_successes, final_observations,
                                  flatten_obs, make_vector_env, obs_names)

RANDOM_POLICY_VERSION = -1  # tags transitions from uniform random warm-up actions


class Rollout:
    def __init__(self, env_cfg: EnvConfig, env_info: EnvInfo, num_envs: int, *, seed: int, actor_index: int = 0):
        self.num_envs = num_envs
        self.envs = make_vector_env(env_cfg, num_envs)
        self.obs_names = obs_names(self.envs.single_observation_space)
        seeds = env_seeds(seed, STREAM_TRAIN, actor_index, num_envs + 2)
        self.obs, _ = self.envs.reset(seed=seeds[:num_envs])
        self.envs.action_space.seed(seeds[num_envs])
        self.rng = np.random.default_rng(seeds[num_envs])
        self.policy_rng = np.random.default_rng(seeds[num_envs + 1])
        self.low, self.high = env_info.action_low, env_info.action_high
        self.policy: NumpyPolicy | None = None  # random actions until the first weights arrive
        self.policy_version = RANDOM_POLICY_VERSION
        self.episode_return = np.zeros(num_envs)
        self.episode_length = np.zeros(num_envs, dtype=np.int64)
        self.finished: list[tuple[float, int, float | None]] = []
        # Episode ids: random per rollout, so that ids from different actors,
        # restarts and sessions never meet in a shard; they only group transitions, so runs stay
        # deterministic for a seed.
        self.next_episode = secrets.randbits(30) << 32
        self.episode_id = self.next_episode + np.arange(num_envs, dtype=np.int64)
        self.next_episode += num_envs
        self.steps = 0  # vector steps taken
        self.seconds_env = 0.0  # time in env.step and in policy inference, for the per-stage figures
        self.seconds_inference = 0.0

    def load_weights(self, weights: Mapping[str, np.ndarray], version: int) -> None:
        self.policy = NumpyPolicy(weights)
        self.policy_version = int(version)

    def step(self, random_actions: bool) -> dict[str, np.ndarray]:
        """Step every env once; return the M transitions made."""
        t0 = time.perf_counter()
        if random_actions or self.policy_version == RANDOM_POLICY_VERSION:
            action = self.rng.uniform(self.low, self.high, size=(self.num_envs, len(self.low))).astype(np.float32)
            version = RANDOM_POLICY_VERSION
        else:
            action = self.policy(flatten_obs(self.obs, self.obs_names), self.policy_rng)
            version = self.policy_version
        t1 = time.perf_counter()
        next_obs, reward, terminated, truncated, info = self.envs.step(action)
        self.seconds_env += time.perf_counter() - t1
        self.seconds_inference += t1 - t0
        done = terminated | truncated
        # Same-step autoreset: next_obs of a finished env already starts a new episode; the
        # transition must end at the episode's own last observation.
        finals = final_observations(info, done) if done.any() else {}
        transitions = self._observations(self.obs, "obs", {})
        transitions.update({"action": action, "reward": reward.astype(np.float32)})
        transitions.update(self._observations(next_obs, "next_obs", finals))
        transitions.update({"terminated": terminated.astype(np.bool_), "truncated": truncated.astype(np.bool_),
                            "policy_version": np.full(self.num_envs, version, dtype=np.int64)})
        transitions["episode"] = self.episode_id.copy()
        self.episode_return += reward
        self.episode_length += 1
        for i, success in zip(np.flatnonzero(done), episode_successes(info, done) if done.any() else []):
            self.finished.append((float(self.episode_return[i]), int(self.episode_length[i]), success))
            self.episode_return[i], self.episode_length[i] = 0.0, 0
            self.episode_id[i], self.next_episode = self.next_episode, self.next_episode + 1
        self.obs = next_obs
        self.steps += 1
        return transitions

    def _observations(self, obs, prefix: str, finals: Mapping[int, object]) -> dict[str, np.ndarray]:
        """Stored fields of a batch of observations, with `finals` (env index -> last observation)
        put in place of the rows of finished envs."""
        if not self.obs_names:
            out = np.array(obs, dtype=np.float32) if finals else obs.astype(np.float32, copy=False)
            for i, final in finals.items():
                out[i] = final
            return {prefix: out}
        fields = {}
        for key in self.obs_names:
            out = np.array(obs[key], dtype=np.float32)
            for i, final in finals.items():
                out[i] = final[key]
            fields[f"{prefix}/{key}"] = out
        return fields

    def pop_finished(self) -> list[tuple[float, int, float | None]]:
        """(return, length, success or None) of the episodes finished since the last call."""
        finished, self.finished = self.finished, []
        return finished

    def close(self) -> None:
        self.envs.close()
