"""One factory for single and vector environments, with distinct reproducible seeds per env."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, SyncVectorEnv

from sacfleet.common.config import ConfigError, EnvConfig

POINTMASS_ID = "sacfleet/PointMass-v0"

# Seed streams keep training, evaluation and per-actor envs on disjoint random sequences.
STREAM_TRAIN = 0
STREAM_EVAL = 1


def register_envs() -> None:
    if POINTMASS_ID not in gym.registry:
        gym.register(id=POINTMASS_ID, entry_point="sacfleet.common.pointmass:PointMassEnv")


register_envs()


@dataclass(frozen=True)
class EnvInfo:
    """What the learner and the replay need to know about an env: shapes and action bounds."""

    obs_dim: int
    act_dim: int
    action_low: np.ndarray
    action_high: np.ndarray
    max_episode_steps: int | None

    def to_dict(self) -> dict:
        """Plain values, as checkpoints store them."""
        return {"obs_dim": self.obs_dim, "act_dim": self.act_dim, "action_low": self.action_low.tolist(),
                "action_high": self.action_high.tolist(), "max_episode_steps": self.max_episode_steps}


def make_env(cfg: EnvConfig, **extra) -> gym.Env:
    if cfg.id not in gym.registry:
        close = difflib.get_close_matches(cfg.id, list(gym.registry), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(f"env.id: {cfg.id!r} is not a registered gymnasium environment{hint}")
    try:
        env = gym.make(cfg.id, **{**cfg.kwargs, **extra})
    except TypeError as exc:
        raise ConfigError(f"env.kwargs: {cfg.id} rejected {cfg.kwargs}: {exc}") from None
    _check_spaces(cfg.id, env)
    return env


def _check_spaces(env_id: str, env: gym.Env) -> None:
    if not isinstance(env.action_space, gym.spaces.Box) or len(env.action_space.shape) != 1:
        raise ConfigError(f"env.id: SAC needs a 1-D continuous (Box) action space; {env_id} has {env.action_space}")
    if not isinstance(env.observation_space, gym.spaces.Box) or len(env.observation_space.shape) != 1:
        raise ConfigError(f"env.id: sacfleet needs a flat Box observation space; {env_id} has {env.observation_space}")
    if not (np.all(np.isfinite(env.action_space.low)) and np.all(np.isfinite(env.action_space.high))):
        raise ConfigError(f"env.id: {env_id} has unbounded actions; the squashed policy needs finite bounds")


class DropStepInfo(gym.Wrapper):
    """Returns an empty info dict from step. The vector env merges every key of every env's info
    into arrays at each step (about 12% of a HalfCheetah step); the rollout needs none of them."""

    def step(self, action):
        obs, reward, terminated, truncated, _ = self.env.step(action)
        return obs, reward, terminated, truncated, {}


def make_vector_env(cfg: EnvConfig, num_envs: int) -> SyncVectorEnv:
    """`num_envs` copies in one process. Same-step autoreset: a finished episode's last
    observation is in info['final_obs'] and the returned one already starts the next episode,
    so no transition ever links two episodes. The envs' own step infos are dropped."""
    return SyncVectorEnv([lambda: DropStepInfo(make_env(cfg)) for _ in range(num_envs)],
                         autoreset_mode=AutoresetMode.SAME_STEP)


def describe_env(cfg: EnvConfig) -> EnvInfo:
    env = make_env(cfg)
    try:
        return EnvInfo(
            obs_dim=int(env.observation_space.shape[0]),
            act_dim=int(env.action_space.shape[0]),
            action_low=env.action_space.low.astype(np.float32),
            action_high=env.action_space.high.astype(np.float32),
            max_episode_steps=env.spec.max_episode_steps if env.spec else None,
        )
    finally:
        env.close()


def env_seeds(base_seed: int, stream: int, index: int, count: int) -> list[int]:
    """`count` distinct seeds for envs of one user (`index`: an actor's number) of one stream."""
    state = np.random.SeedSequence([base_seed, stream, index]).generate_state(count, dtype=np.uint64)
    return [int(s) for s in state]
