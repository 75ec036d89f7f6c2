"""When a run's periodic work falls due, for both trainers: progress records, evaluations and checkpoints,
each on a counter that only grows (env steps, updates, wall seconds)."""

from __future__ import annotations

import math


class Every:
    """Due at each multiple of `period` of a counter (env steps, updates), or, not `aligned`, `period`
    after it last ran (wall seconds). A period of 0 is the config's "off": never due."""

    def __init__(self, period: float, now: float = 0.0, aligned: bool = True):
        self.period, self.aligned = period, aligned
        self.restart(now)

    def reached(self, now: float) -> bool:
        return now >= self.next

    def restart(self, now: float) -> None:
        """The job ran at `now`: it is next due one period later (at the next multiple when aligned)."""
        if not self.period:
            self.next = math.inf
        else:
            self.next = (now // self.period + 1) * self.period if self.aligned else now + self.period

    def due(self, now: float) -> bool:
        """Whether the job is due at `now`; if it is, the next time counts from `now`."""
        if not self.reached(now):
            return False
        self.restart(now)
        return True


class RunSchedule:
    """A run's periodic work as its config sets it: a progress record every train.log_interval env
    steps; an evaluation every eval.interval, except at the last step, where the final evaluation
    stands in; a checkpoint every checkpoint.interval updates or checkpoint.interval_s seconds,
    whichever comes first (both count again from there). A resumed run counts on from where it is."""

    def __init__(self, cfg, env_steps: int = 0, updates: int = 0, wall: float = 0.0):
        self.total_env_steps = cfg.train.total_env_steps
        self.logs = Every(cfg.train.log_interval, env_steps)
        self.evals = Every(cfg.eval.interval, env_steps)
        self.checkpoint_updates = Every(cfg.checkpoint.interval, updates)
        self.checkpoint_wall = Every(cfg.checkpoint.interval_s, wall, aligned=False)

    def log(self, env_steps: int) -> bool:
        return self.logs.due(env_steps)

    def evaluation(self, env_steps: int) -> bool:
        return env_steps < self.total_env_steps and self.evals.due(env_steps)

    def checkpoint(self, updates: int, wall: float) -> bool:
        if not (self.checkpoint_updates.reached(updates) or self.checkpoint_wall.reached(wall)):
            return False
        self.checkpoint_updates.restart(updates)
        self.checkpoint_wall.restart(wall)
        return True
