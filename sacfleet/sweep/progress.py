"""A sweep's progress view, fed by Tune's trial events: one line per running trial (point, seed, steps,
eval, updates/s, eta), redrawn in place on a terminal and printed as plain lines (at most one per
trial every PLAIN_EVERY_S) elsewhere; a line for each trial that starts, finishes or fails."""

from __future__ import annotations

import math
import sys
import time
from typing import Callable, TextIO

from ray.tune import Callback

PLAIN_EVERY_S = 10.0


def error_cause(text: str | None) -> str:
    """A trial's cause of failure from Tune's error trace: what our trial raised, or the trace's last line."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    for line in reversed(lines):
        for name in ("TrialFailed: ", "TrialInterrupted: "):
            if name in line:
                return line.split(name, 1)[1]
    return lines[-1] if lines else "its Tune actor failed (its error.txt is under the sweep's tune/)"


def describe(result: dict, before: dict | None = None) -> str:
    """A running trial's line; its eta from the pace since the result `before` (the pace before
    learning starts, of random actions, says nothing of what follows)."""
    steps, total = int(result.get("env_steps") or 0), int(result.get("total_env_steps") or 0)
    wall, rate = float(result.get("wall_seconds") or 0.0), float(result.get("updates_per_s") or 0.0)
    evaluation = result.get("eval")
    eta = ""
    if before is not None and total and steps < total:
        span, done = wall - float(before.get("wall_seconds") or 0.0), steps - int(before.get("env_steps") or 0)
        if span > 0 and done > 0:
            eta = f"  eta {(total - steps) * span / done:5.0f} s"
    shown = "" if evaluation is None or not math.isfinite(evaluation) else f"{evaluation:9.2f}"
    return (f"steps {steps:>9,}/{total:<9,} eval {shown:>9}  {rate:6.0f} updates/s{eta}")


class SweepProgress(Callback):
    """Tune callback: the running trials' lines, and what became of each trial."""

    def __init__(self, out: TextIO | None = None, tty: bool | None = None,
                 recorded: Callable[[dict], str | None] = lambda config: None,
                 stopping: Callable[[], bool] = lambda: False):
        self.recorded = recorded  # a trial's cause of failure as its outcome file has it
        self.stopping = stopping
        self.previous: dict[str, dict] = {}
        self.out = out or sys.stdout
        self.tty = self.out.isatty() if tty is None else tty
        self.running: dict[str, str] = {}  # trial id -> line
        self.names: dict[str, str] = {}
        self.printed_at: dict[str, float] = {}
        self.drawn = 0  # lines of the live block on screen

    def __getstate__(self):
        return {}  # Tune pickles its callbacks with the experiment state, which a sweep never restores

    @staticmethod
    def name(trial) -> str:
        return f"{trial.config['trial']['point']} s{trial.config['trial']['seed']}"

    def say(self, line: str) -> None:
        """A line that stays (above the live block on a terminal)."""
        self._clear()
        print(line, file=self.out, flush=True)
        self._draw()

    def on_trial_start(self, iteration, trials, trial, **info):
        self.names[trial.trial_id] = self.name(trial)
        self.running[trial.trial_id] = "starting"
        self.say(f"{self.name(trial)}: started")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("status") != "running":
            return
        line = describe(result, self.previous.get(trial.trial_id))
        self.previous[trial.trial_id] = result
        self.running[trial.trial_id] = line
        if self.tty:
            self._clear()
            self._draw()
        elif time.monotonic() - self.printed_at.get(trial.trial_id, -math.inf) >= PLAIN_EVERY_S:
            self.printed_at[trial.trial_id] = time.monotonic()
            print(f"{self.name(trial):<24} {line}", file=self.out, flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.running.pop(trial.trial_id, None)
        last = trial.last_result or {}
        self.say(f"{self.name(trial)}: finished, final eval {last.get('eval', float('nan')):.2f} "
                 f"({float(last.get('wall_seconds') or 0):.0f} s, {float(last.get('updates_per_s') or 0):.0f} updates/s)")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.running.pop(trial.trial_id, None)
        cause = self.recorded(trial.config["trial"])
        if cause is None and self.stopping():
            self.say(f"{self.name(trial)}: stopped; rerunning the sweep continues it")
            return
        self.say(f"{self.name(trial)}: FAILED: {cause or error_cause(trial.get_error())}")

    def on_experiment_end(self, trials, **info):
        self._clear()

    def _clear(self) -> None:
        if self.tty and self.drawn:
            self.out.write(f"\x1b[{self.drawn}F\x1b[J")  # up to the block's first line, erase to the end
            self.drawn = 0

    def _draw(self) -> None:
        if not self.tty or not self.running:
            return
        lines = [f"  {self.names[t]:<24} {line}" for t, line in self.running.items()]
        self.out.write("\n".join(lines) + "\n")
        self.out.flush()
        self.drawn = len(lines)

    @property
    def live(self) -> int:
        return len(self.running)
