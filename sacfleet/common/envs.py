"""One factory for single and vector environments, with distinct reproducible seeds per env, and the
shape facts (`EnvInfo`) every component needs, for flat and Dict (goal-conditioned) observations."""

from __future__ import annotations

import contextlib
import difflib
import io
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, SyncVectorEnv

from sacfleet.common.config import ConfigError, EnvConfig

POINTMASS_ID = "sacfleet/PointMass-v0"
POINTMASS_GOAL_ID = "sacfleet/PointMassGoal-v0"
GOAL_KEYS = ("achieved_goal", "desired_goal")  # gymnasium-robotics' goal-env layout, which HER relabels

# Seed streams keep training, evaluation and per-actor envs on disjoint random sequences.
STREAM_TRAIN = 0
STREAM_EVAL = 1


def register_envs() -> None:
    if POINTMASS_ID not in gym.registry:
        gym.register(id=POINTMASS_ID, entry_point="sacfleet.common.pointmass:PointMassEnv")
    if POINTMASS_GOAL_ID not in gym.registry:
        gym.register(id=POINTMASS_GOAL_ID, entry_point="sacfleet.common.pointmass:PointMassGoalEnv",
                     max_episode_steps=50)


def _register_robotics() -> bool:
    """Register gymnasium-robotics' envs (Fetch, ...) on first need: importing it loads MuJoCo models'
    registrations and prints a warning, which flat-env runs should not pay for."""
    try:
        # Its import prints a Farama notice about the Adroit hand envs' rewards to stderr, in every
        # Ray worker that makes an env; it does not concern the tasks sacfleet runs.
        with contextlib.redirect_stderr(io.StringIO()):
            import gymnasium_robotics
    except ImportError:
        return False
    gym.register_envs(gymnasium_robotics)
    return True


register_envs()


@dataclass(frozen=True)
class EnvInfo:
    """What the learner and the replay need to know about an env: shapes and action bounds."""

    obs_dim: int
    act_dim: int
    action_low: np.ndarray
    action_high: np.ndarray
    max_episode_steps: int | None
    # A Dict observation's keys and widths in the order the networks see them concatenated (the Dict
    # space's own order, which gymnasium sorts by name); empty for a flat Box observation.
    obs_keys: tuple[tuple[str, int], ...] = ()

    @property
    def goal_conditioned(self) -> bool:
        """A goal env's layout: HER can relabel its desired goals with achieved ones."""
        names = [name for name, _ in self.obs_keys]
        return all(key in names for key in GOAL_KEYS)

    def to_dict(self) -> dict:
        """Plain values, as checkpoints store them."""
        return {"obs_dim": self.obs_dim, "act_dim": self.act_dim, "action_low": self.action_low.tolist(),
                "action_high": self.action_high.tolist(), "max_episode_steps": self.max_episode_steps,
                "obs_keys": [list(pair) for pair in self.obs_keys]}


def check_env_config(cfg, env_info: EnvInfo) -> None:
    """Config choices that depend on the env (`cfg`: the whole Config)."""
    if cfg.replay.her != "off" and not env_info.goal_conditioned:
        raise ConfigError(f"replay.her: {cfg.replay.her!r} needs a goal env (a Dict observation with keys "
                          f"{' and '.join(GOAL_KEYS)}); {cfg.env.id} has "
                          f"{[k for k, _ in env_info.obs_keys] or 'a flat Box observation'}; set replay.her=off")


def make_env(cfg: EnvConfig, **extra) -> gym.Env:
    if cfg.id not in gym.registry and not _register_robotics() and cfg.id.startswith(("Fetch", "HandManipulate")):
        raise ConfigError(f"env.id: {cfg.id!r} comes with gymnasium-robotics, which is not installed; "
                          f"install it with: pip install 'sacfleet[robotics]' -c constraints.txt")
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
    space = env.observation_space
    flat = lambda box: isinstance(box, gym.spaces.Box) and len(box.shape) == 1  # noqa: E731
    if not (flat(space) or (isinstance(space, gym.spaces.Dict) and space.spaces
                            and all(flat(sub) for sub in space.spaces.values()))):
        raise ConfigError(f"env.id: sacfleet needs a flat Box observation space or a Dict of flat Boxes; "
                          f"{env_id} has {space}")
    if not (np.all(np.isfinite(env.action_space.low)) and np.all(np.isfinite(env.action_space.high))):
        raise ConfigError(f"env.id: {env_id} has unbounded actions; the squashed policy needs finite bounds")


class DropStepInfo(gym.Wrapper):
    """Returns an empty info dict from step, except `is_success` at an episode's last step. The vector
    env merges every key of every env's info into arrays at each step (about 12% of a HalfCheetah
    step); the rollout needs only the success flag of finished episodes."""

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        if (terminated or truncated) and "is_success" in info:
            return obs, reward, terminated, truncated, {"is_success": float(info["is_success"])}
        return obs, reward, terminated, truncated, {}


def episode_successes(info: dict, done: np.ndarray) -> list[float | None]:
    """`is_success` of each finished env of a vector step (same-step autoreset puts the last step's
    info under info['final_info']); None where the env does not report it."""
    final = info.get("final_info", {})
    flags, mask = final.get("is_success"), final.get("_is_success")
    return [float(flags[i]) if flags is not None and mask[i] else None for i in np.flatnonzero(done)]


def final_observations(info: dict, done: np.ndarray) -> dict[int, object]:
    """The true last observation of each finished env (a dict for Dict observations): the vector
    env keeps them in an object array, one entry per env."""
    final = info["final_obs"]
    return {int(i): final[i] for i in np.flatnonzero(done)}


def obs_names(space: gym.Space) -> tuple[str, ...]:
    """A Dict observation space's keys in the order the networks see them (the space's own, which
    gymnasium sorts by name); empty for a flat Box."""
    return tuple(space.spaces) if isinstance(space, gym.spaces.Dict) else ()


def flatten_obs(obs, names: tuple[str, ...]) -> np.ndarray:
    """What the networks see: a Dict observation's arrays concatenated along the last axis in the
    order of `names`, as float32; a flat observation (`names` empty) as float32."""
    if not names:
        return np.asarray(obs, dtype=np.float32)
    return np.concatenate([np.asarray(obs[key], dtype=np.float32) for key in names], axis=-1)


def make_vector_env(cfg: EnvConfig, num_envs: int) -> SyncVectorEnv:
    """`num_envs` copies in one process. Same-step autoreset: a finished episode's last
    observation is in info['final_obs'] and the returned one already starts the next episode,
    so no transition ever links two episodes. The envs' own step infos are dropped."""
    return SyncVectorEnv([lambda: DropStepInfo(make_env(cfg)) for _ in range(num_envs)],
                         autoreset_mode=AutoresetMode.SAME_STEP)


def describe_env(cfg: EnvConfig) -> EnvInfo:
    env = make_env(cfg)
    try:
        space = env.observation_space
        keys = tuple((name, int(space.spaces[name].shape[0])) for name in obs_names(space))
        return EnvInfo(
            obs_dim=sum(width for _, width in keys) if keys else int(space.shape[0]),
            act_dim=int(env.action_space.shape[0]),
            action_low=env.action_space.low.astype(np.float32),
            action_high=env.action_space.high.astype(np.float32),
            max_episode_steps=env.spec.max_episode_steps if env.spec else None,
            obs_keys=keys,
        )
    finally:
        env.close()


def env_seeds(base_seed: int, stream: int, index: int, count: int) -> list[int]:
    """`count` distinct seeds for envs of one user (`index`: an actor's number) of one stream."""
    state = np.random.SeedSequence([base_seed, stream, index]).generate_state(count, dtype=np.uint64)
    return [int(s) for s in state]
