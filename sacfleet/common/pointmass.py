"""The point-mass control task of seed 000 (`ContinuousPointMass1DEnv`) as a gymnasium env.

With `dims=1` it is the seed's env step for step: same dynamics, reward, reset distribution,
200-step horizon and action limit 2.0. `dims=n` runs n independent axes with a summed cost.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces


class PointMassEnv(gym.Env):
    """State [position (n), velocity (n)]; action: acceleration in [-limit, limit]^n;
    reward -(|p|^2 + 0.1 |v|^2 + 0.001 |a|^2); truncated after `max_steps`, never terminated."""

    metadata = {"render_modes": []}

    def __init__(self, dims: int = 1, dt: float = 0.05, max_steps: int = 200, action_limit: float = 2.0):
        if int(dims) < 1:
            raise ValueError(f"dims must be >= 1, got {dims}")
        self.dims = int(dims)
        self.dt = float(dt)
        self.max_steps = int(max_steps)
        self.action_limit = float(action_limit)
        self.action_space = spaces.Box(-self.action_limit, self.action_limit, (self.dims,), np.float32)
        self.observation_space = spaces.Box(-np.inf, np.inf, (2 * self.dims,), np.float32)
        self._state = np.zeros(2 * self.dims, dtype=np.float32)
        self._t = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._t = 0
        # Position draws come before velocity draws, as in the seed, so dims=1 reproduces it.
        pos = self.np_random.uniform(-1.0, 1.0, size=self.dims)
        vel = self.np_random.uniform(-1.0, 1.0, size=self.dims)
        self._state = np.concatenate([pos, vel]).astype(np.float32)
        return self._state.copy(), {}

    def step(self, action):
        a = np.clip(np.asarray(action, dtype=np.float32).reshape(self.dims),
                    -self.action_limit, self.action_limit).astype(np.float64)
        # Integrate in float64 from the float32 state and round the state once, as the seed does;
        # the reward uses the unrounded values.
        pos = self._state[: self.dims].astype(np.float64)
        vel = self._state[self.dims:].astype(np.float64) + self.dt * a
        pos = pos + self.dt * vel
        self._state = np.concatenate([pos, vel]).astype(np.float32)
        reward = -float(np.sum(pos * pos + 0.1 * vel * vel + 0.001 * a * a))
        self._t += 1
        return self._state.copy(), reward, False, self._t >= self.max_steps, {}


class PointMassGoalEnv(gym.Env):
    """The same point mass, goal-conditioned in gymnasium-robotics' layout: reach a sampled goal.

    Dict observation: `observation` [position (n), velocity (n)], `achieved_goal` = position,
    `desired_goal` = goal, both drawn uniformly from [-1, 1]^n at reset (the mass starts at rest).
    Sparse reward: 0 within `tolerance` of the goal, -1 elsewhere, computed by the vectorized
    `compute_reward` that hindsight relabeling calls; `info["is_success"]` says whether it is within
    the tolerance. Never terminates; the registered env truncates after 50 steps."""

    metadata = {"render_modes": []}

    def __init__(self, dims: int = 2, dt: float = 0.05, action_limit: float = 2.0, tolerance: float = 0.1):
        if int(dims) < 1:
            raise ValueError(f"dims must be >= 1, got {dims}")
        self.dims, self.dt = int(dims), float(dt)
        self.action_limit, self.tolerance = float(action_limit), float(tolerance)
        self.action_space = spaces.Box(-self.action_limit, self.action_limit, (self.dims,), np.float32)
        goal = spaces.Box(-np.inf, np.inf, (self.dims,), np.float32)
        self.observation_space = spaces.Dict({
            "observation": spaces.Box(-np.inf, np.inf, (2 * self.dims,), np.float32),
            "achieved_goal": goal, "desired_goal": goal})
        self._pos = np.zeros(self.dims, np.float32)
        self._vel = np.zeros(self.dims, np.float32)
        self._goal = np.zeros(self.dims, np.float32)

    def compute_reward(self, achieved_goal, desired_goal, info=None) -> np.ndarray:
        """0 where the achieved goal is within the tolerance of the desired one, else -1; works on
        single goals and on batches [..., dims]."""
        distance = np.linalg.norm(np.asarray(achieved_goal) - np.asarray(desired_goal), axis=-1)
        return (distance <= self.tolerance).astype(np.float32) - 1.0

    def compute_terminated(self, achieved_goal, desired_goal, info=None) -> np.ndarray:
        """Whether reaching `desired_goal` ends the episode: never (gymnasium-robotics' GoalEnv
        interface, which hindsight relabeling calls for each goal it draws)."""
        return np.zeros(np.shape(achieved_goal)[:-1], dtype=bool)

    def _obs(self) -> dict:
        return {"observation": np.concatenate([self._pos, self._vel]), "achieved_goal": self._pos.copy(),
                "desired_goal": self._goal.copy()}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._pos = self.np_random.uniform(-1.0, 1.0, size=self.dims).astype(np.float32)
        self._vel = np.zeros(self.dims, np.float32)
        self._goal = self.np_random.uniform(-1.0, 1.0, size=self.dims).astype(np.float32)
        return self._obs(), {"is_success": float(self.compute_reward(self._pos, self._goal) == 0.0)}

    def step(self, action):
        a = np.clip(np.asarray(action, dtype=np.float32).reshape(self.dims), -self.action_limit, self.action_limit)
        self._vel = (self._vel + self.dt * a).astype(np.float32)
        self._pos = (self._pos + self.dt * self._vel).astype(np.float32)
        reward = float(self.compute_reward(self._pos, self._goal))
        return self._obs(), reward, False, False, {"is_success": float(reward == 0.0)}
