"""Hindsight experience replay inside a shard: an index of which stored transitions form each episode,
and the relabeling of sampled transitions with goals achieved later in their own episode, their
rewards recomputed by the env's vectorized `compute_reward` and their `terminated` flags by its
`compute_terminated` (Andrychowicz et al., 2017; gymnasium-robotics' GoalEnv interface): a transition
that ended its episode by reaching the old goal does not end it for a new one, and the other way round.

Goals come only from the transition's own episode: an episode's transitions all reach one shard (an
env actor inserts into one shard), and the ring overwrites an episode oldest first, so every goal
drawn from a transition's own step onwards is still stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from sacfleet.common.config import ConfigError, EnvConfig

STRATEGIES = ("future", "final", "episode")
ACHIEVED, DESIRED = "next_obs/achieved_goal", ("obs/desired_goal", "next_obs/desired_goal")


@dataclass
class _Episode:
    slots: list[int] = field(default_factory=list)  # slot of each step, in order
    first: int = 0  # steps already overwritten by the ring
    done: bool = False  # its last step (terminated or truncated) is stored


class EpisodeIndex:
    """Episode membership and step number of every filled slot, kept as transitions are written."""

    def __init__(self, capacity: int):
        self.episode_of = np.full(capacity, -1, dtype=np.int64)
        self.step_of = np.zeros(capacity, dtype=np.int64)
        self.episodes: dict[int, _Episode] = {}

    def on_insert(self, slots: np.ndarray, episode: np.ndarray, done: np.ndarray) -> None:
        """Record transitions written to `slots` (in insertion order)."""
        old = self.episode_of[slots]
        ids, counts = np.unique(old[old >= 0], return_counts=True)
        for ep, count in zip(ids.tolist(), counts.tolist()):
            record = self.episodes[ep]
            record.first += count
            # Gone from the ring: forget it, finished or not (an actor that stopped mid-episode
            # never finishes it; one that goes on starts a fresh record, numbered from there).
            if record.first >= len(record.slots):
                del self.episodes[ep]
        for slot, ep, end in zip(slots.tolist(), episode.tolist(), done.tolist()):
            record = self.episodes.get(ep)
            if record is None:
                record = self.episodes[ep] = _Episode()
            self.episode_of[slot] = ep
            self.step_of[slot] = len(record.slots)
            record.slots.append(slot)
            record.done = record.done or end

    def rebuild(self, keys: np.ndarray, episode: np.ndarray, done: np.ndarray) -> None:
        """Index restored storage: `keys` are the filled slots' insertion numbers."""
        self.episode_of[:] = -1
        self.episodes.clear()
        order = np.argsort(keys, kind="stable")
        self.on_insert(order, episode[order], done[order])

    def goal_slots(self, slots: np.ndarray, strategy: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """For each of `slots`, the slot whose achieved goal relabels it: for `future`, a step from the
        transition's own onwards; `final`, the episode's last step (only once it is stored); `episode`,
        any stored step. Returns (mask of the slots given a goal, their goal slots)."""
        records = [self.episodes[ep] for ep in self.episode_of[slots].tolist()]
        count = len(records)
        stored = np.fromiter((len(r.slots) for r in records), np.int64, count)
        if strategy == "final":
            ok = np.fromiter((r.done for r in records), bool, count)
            picks = stored - 1
        else:
            low = (self.step_of[slots] if strategy == "future"
                   else np.fromiter((r.first for r in records), np.int64, count))
            ok = np.ones(count, dtype=bool)
            picks = low + (rng.random(count) * (stored - low)).astype(np.int64)
        goals = np.fromiter((r.slots[p] for r, p, good in zip(records, picks.tolist(), ok.tolist()) if good),
                            np.int64)
        return ok, goals


GoalFn = Callable[[np.ndarray, np.ndarray, object], np.ndarray]  # (achieved, desired, infos) -> per goal


class HindsightRelabeler:
    """Relabels a sampled batch in place: each transition, with probability k/(k+1), gets a goal
    achieved in its own episode as its desired goal (in obs and next_obs), and the reward and the
    termination the env gives for that goal."""

    def __init__(self, capacity: int, strategy: str, k: int, compute_reward: GoalFn, compute_terminated: GoalFn,
                 rng: np.random.Generator):
        if strategy not in STRATEGIES:
            raise ValueError(f"HER strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        self.index = EpisodeIndex(capacity)
        self.strategy, self.fraction = strategy, k / (k + 1)
        self.compute_reward, self.compute_terminated, self.rng = compute_reward, compute_terminated, rng
        self.relabeled = 0  # transitions relabeled so far
        self.sampled = 0

    def on_insert(self, slots: np.ndarray, batch: Mapping[str, np.ndarray]) -> None:
        self.index.on_insert(slots, batch["episode"], batch["terminated"] | batch["truncated"])

    def relabel(self, slots: np.ndarray, data: dict[str, np.ndarray], stored: Mapping[str, np.ndarray]) -> np.ndarray:
        """Relabel rows of `data` (gathered from flat `slots` of the `stored` arrays) in place;
        returns the rows relabeled."""
        chosen = np.flatnonzero(self.rng.random(slots.size) < self.fraction)
        ok, goal_slots = self.index.goal_slots(slots[chosen], self.strategy, self.rng)
        rows = chosen[ok]
        self.sampled += slots.size
        self.relabeled += rows.size
        if rows.size == 0:
            return rows
        goals = np.take(stored[ACHIEVED], goal_slots, axis=0)
        for name in DESIRED:
            data[name][rows] = goals
        infos = [{} for _ in range(rows.size)]
        reward = np.asarray(self.compute_reward(data[ACHIEVED][rows], goals, infos), dtype=np.float32)
        if reward.shape != (rows.size,) or not np.isfinite(reward).all():
            raise ValueError(f"compute_reward returned {reward.shape} values for {rows.size} goals "
                             f"(or non-finite ones); HER needs the env's vectorized compute_reward")
        data["reward"][rows] = reward
        # GoalEnvs that never terminate (Fetch) answer one False for the whole batch.
        terminated = np.asarray(self.compute_terminated(data[ACHIEVED][rows], goals, infos))
        if terminated.shape not in ((), (rows.size,)):
            raise ValueError(f"compute_terminated returned {terminated.shape} values for {rows.size} goals; HER needs "
                             f"the env's vectorized compute_terminated")
        data["terminated"][rows] = np.broadcast_to(terminated.astype(bool), (rows.size,))
        return rows


def env_goal_functions(env_cfg: EnvConfig) -> tuple[GoalFn, GoalFn]:
    """The env's own vectorized `compute_reward` and `compute_terminated(achieved_goal, desired_goal,
    info)`, which relabeling needs to say what a new goal means for a stored transition."""
    from sacfleet.common.envs import make_env

    env = make_env(env_cfg)
    functions = [getattr(env.unwrapped, name, None) for name in ("compute_reward", "compute_terminated")]
    missing = [name for name, fn in zip(("compute_reward", "compute_terminated"), functions) if fn is None]
    if missing:
        env.close()
        raise ConfigError(f"replay.her: {env_cfg.id} has no {' or '.join(f'{name}(achieved_goal, desired_goal, info)' for name in missing)}, "
                          f"which relabeling needs to recompute rewards and terminations for the goals it draws "
                          f"(gymnasium-robotics' GoalEnv interface); set replay.her=off")
    return functions[0], functions[1]
