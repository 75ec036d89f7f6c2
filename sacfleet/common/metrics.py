"""Run metrics: one JSON line per record in metrics.jsonl, the same scalars as TensorBoard events,
and a rolling window of episode statistics (Stable-Baselines3 names: rollout/ep_rew_mean, ...)."""

from __future__ import annotations

import json
import math
import threading
import warnings
from collections import deque
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence


class EpisodeStats:
    """Mean return and length over the last `window` finished episodes (Stable-Baselines3's
    ep_rew_mean), and the mean return of the episodes finished since the last `recent_mean()`: a
    100-episode mean lags the policy by 100 episodes, a whole run of 200-step point-mass episodes."""

    def __init__(self, window: int = 100):
        self.returns: deque[float] = deque(maxlen=window)
        self.lengths: deque[int] = deque(maxlen=window)
        self.successes: deque[float] = deque(maxlen=window)  # of the episodes whose env reports is_success
        self.count = 0
        self.recent: list[float] = []

    def extend(self, episodes: Iterable[Sequence]) -> None:
        """(return, length) or (return, length, success or None) per finished episode."""
        for ret, length, *success in episodes:
            self.returns.append(ret)
            self.lengths.append(length)
            if success and success[0] is not None:
                self.successes.append(float(success[0]))
            self.recent.append(ret)
            self.count += 1

    def recent_mean(self) -> dict[str, float]:
        """{"rollout/ep_rew_recent": mean return of the episodes since the last call}, then forgets them."""
        recent, self.recent = self.recent, []
        return {"rollout/ep_rew_recent": sum(recent) / len(recent)} if recent else {}

    def summary(self) -> dict[str, float]:
        if not self.returns:
            return {}
        summary = {"rollout/ep_rew_mean": sum(self.returns) / len(self.returns),
                   "rollout/ep_len_mean": sum(self.lengths) / len(self.lengths)}
        if self.successes:
            summary["rollout/success_rate"] = sum(self.successes) / len(self.successes)
        return summary


class MetricsLogger:
    """metrics.jsonl and TensorBoard events. A write that fails (a full disk) is reported once through
    `on_error` and the record dropped; training goes on, and later records are written once the disk
    takes them again (TensorBoard's writer does not recover: its events stop)."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, on_error: Callable[[str], None] | None = None):
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.on_error = on_error or (lambda message: warnings.warn(message, stacklevel=3))
        self.failed: set[str] = set()  # what has been reported
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:  # tensorboard is a core dependency, but the learner must run without it
                warnings.warn(f"TensorBoard events disabled: {exc}", stacklevel=2)
            else:
                _quiet_tensorboard_write_errors()
                self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, env_steps: int, wall_seconds: float, values: Mapping[str, float]) -> None:
        clean = {k: float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}
        record = {"env_steps": int(env_steps), "wall_seconds": round(wall_seconds, 3), **clean}
        try:
            self._jsonl.write(json.dumps(record) + "\n")
        except OSError as exc:
            self._failed("metrics.jsonl", exc)
        if self._tb is not None:
            try:
                for key, value in clean.items():
                    self._tb.add_scalar(key, value, env_steps, walltime=None)
            except OSError as exc:
                self._failed("tensorboard", exc)
                self._tb = None

    def _failed(self, what: str, exc: OSError) -> None:
        if what not in self.failed:
            self.failed.add(what)
            stop = "TensorBoard events stop here" if what == "tensorboard" else "records are dropped until it is"
            self.on_error(f"cannot write {what}: {exc.strerror or exc}; training goes on, {stop} (reported once)")

    def close(self) -> None:
        try:
            self._jsonl.close()
        except OSError as exc:
            self._failed("metrics.jsonl", exc)
        if self._tb is not None:
            try:
                self._tb.close()
            except OSError as exc:
                self._failed("tensorboard", exc)


_quieted = False


def _quiet_tensorboard_write_errors() -> None:
    """TensorBoard writes events on a thread that, on a failed write, keeps the error for the next
    add_scalar (where MetricsLogger reports it once) and also lets it escape the thread, which prints a
    traceback; that second report is dropped here, and only for that thread and OSErrors."""
    global _quieted
    if _quieted:
        return
    _quieted = True
    previous = threading.excepthook

    def hook(args) -> None:
        if isinstance(args.exc_value, OSError) and type(args.thread).__name__ == "_AsyncWriterThread":
            return
        previous(args)

    threading.excepthook = hook
