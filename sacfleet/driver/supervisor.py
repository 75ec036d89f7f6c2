"""Watches a running fleet from the driver: polls the learner and the replay shards (and has a dead one
recovered), and at each poll lets the env actor pool and the evaluations look after their own; says
what the fleet has done so far, for progress records and the summary."""

from __future__ import annotations

import functools
import time
from typing import Callable

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from sacfleet.driver.calls import CALL_TIMEOUT, Hung, Lost, PendingCalls, kill_for_restart
from sacfleet.driver.errors import FleetDiverged, FleetError, ray_cause
from sacfleet.driver.evaluations import Evaluations
from sacfleet.driver.report import replay_ratio


PROBE_S = 5.0  # a live component answers a status call in milliseconds, however busy


class FleetSupervisor:
    """`fleet` holds the Ray handles (learner, shards, evaluator) and the env actor pool; `episodes`
    receives finished episodes; `recovery` (recovery.FleetRecovery) brings back a dead learner or shard;
    `env_steps()` is the run's count."""

    def __init__(self, fleet, echo: Callable[[str], None], episodes, recovery, env_steps: Callable[[], int],
                 clock: Callable[[], float] = time.monotonic):
        self.fleet, self.echo, self.episodes, self.recovery, self.env_steps = fleet, echo, episodes, recovery, env_steps
        self.actors = fleet.actors
        self.calls = PendingCalls(fleet.cfg.train.hang_timeout_s, clock)
        self.evaluations = Evaluations(fleet.evaluator, self.calls, recovery, env_steps, clock)
        self._shard_stats: dict[int, dict] = {}
        self.lost_inserts = 0  # transitions the recovered shards had after their last snapshot
        self.lost_updates = 0  # updates the recovered learner had made after the last checkpoint
        self.learner_status: dict = {"updates": 0}

    # -- what the fleet has done

    @property
    def shard_stats(self) -> list[dict]:
        return [self._shard_stats[i] for i in sorted(self._shard_stats)]

    @property
    def inserts(self) -> int:
        return sum(s["inserts"] for s in self.shard_stats)

    @property
    def replay_size(self) -> int:
        return sum(s["size"] for s in self.shard_stats)

    @property
    def samples(self) -> int:
        return sum(s["samples"] for s in self.shard_stats)

    @property
    def updates(self) -> int:
        return self.learner_status["updates"]

    @property
    def stopping(self) -> bool:
        return self.actors.stopping

    def replay_ratio(self) -> float:
        return replay_ratio(self.shard_stats)

    def policy_lag(self) -> float:
        versions = [s["recent_policy_version"] for s in self.shard_stats if s["recent_policy_version"] >= 0]
        return self.updates - sum(versions) / len(versions) if versions else float("nan")

    def stall_values(self) -> dict[str, float]:
        """How long inserts and samples have been held back without a break, for the health checks."""
        return {"actors/insert_blocked_s": self.actors.insert_blocked_seconds(),
                "learner/starved_s": self.learner_status.get("starved_seconds", 0.0)}

    def stage_seconds(self) -> dict[str, float]:
        actors = self.actors.stage_seconds()
        s = self.learner_status
        return {"actors: env step": actors.get("env", 0.0), "actors: policy inference": actors.get("inference", 0.0),
                "actors: waiting on replay (back-pressure)": actors.get("insert_wait", 0.0),
                "learner: sample + copy (prefetch thread)": s.get("seconds_sampling", 0.0),
                "learner: SAC updates": s.get("seconds_update", 0.0),
                "learner: waiting for batches": s.get("seconds_waiting_for_data", 0.0)}

    # -- polling

    def poll(self, read_metrics: bool = False, wait: bool = False) -> None:
        """Refresh the learner's status and the shards' statistics, and look after the env actors and
        evaluations. Without `wait`, a component slow to answer keeps its last known values (so that the
        health checks still see the rest of the fleet, e.g. actors held back by a stuck learner) until it
        has been silent for train.hang_timeout_s. `read_metrics` waits for a fresh status with the
        metrics. A learner or shard whose process died, or that hangs (then it is killed first), is
        recovered here (see recovery.py)."""
        fleet, calls = self.fleet, self.calls
        send = functools.partial(fleet.learner.status.remote, read_metrics, self.calls.timeout / 3)
        # With read_metrics, an answer in flight has none: a fresh one is waited for.
        status = calls.fresh("learner", send) if read_metrics else calls.answer("learner", send, wait=wait)
        if isinstance(status, (Lost, Hung)) or (status is not None and status["awaiting_restore"]):
            self._recover_learner(*_failure(status, fleet.learner))
        elif status is not None:
            self.learner_status = status
            self._raise_learner_error(status)
        for i, shard in enumerate(fleet.shards):
            stats = calls.answer(f"shard{i}", shard.stats.remote,
                                 wait=wait or read_metrics or i not in self._shard_stats)
            if isinstance(stats, (Lost, Hung)) or (stats is not None and stats["awaiting_restore"]):
                self._recover_shard(i, *_failure(stats, shard))
            elif stats is not None:
                self._shard_stats[i] = stats
        if not self.stopping:
            self.evaluations.watch()
            self.actors.supervise()
        self.actors.collect()
        self.episodes.extend(self.actors.take_episodes())

    def silent(self, name: str, call: str) -> bool:
        """`name` ("learner", "shard2") left `call` (e.g. a checkpoint's) unanswered for
        train.hang_timeout_s. Unless it answers a status call within PROBE_S (the learner answers those
        on a thread of their own, even while a first compile holds its update lock), it hangs: it is
        killed and recovered now, rather than after another full wait on its status. Returns whether it hung."""
        learner = name == "learner"
        handle = self.fleet.learner if learner else self.fleet.shards[int(name.removeprefix("shard"))]
        self.calls.drop(name)
        probe = handle.status.remote() if learner else handle.stats.remote()
        if ray.wait([probe], timeout=PROBE_S)[0]:
            return False  # alive, only busy; or dead, which the next poll finds
        answer = Hung(f"hung: no answer to {call} within {self.calls.timeout:g} s, nor to a status call within "
                      f"{PROBE_S:g} s")
        if learner:
            self._recover_learner(*_failure(answer, handle))
        else:
            self._recover_shard(int(name.removeprefix("shard")), *_failure(answer, handle))
        return True

    def _recover_learner(self, cause: str, hung: bool) -> None:
        self.calls.drop("learner")
        done = self.recovery.learner(cause, self.updates, self.env_steps(), hung)
        if done is not None:
            event, updates = done
            self.lost_updates += event.lost_updates
            self.learner_status = {**self.learner_status, "updates": updates}

    def _recover_shard(self, i: int, cause: str, hung: bool) -> None:
        self.calls.drop(f"shard{i}")
        last = self._shard_stats.get(i, {}).get("inserts", 0)
        done = self.recovery.shard(i, cause, last, self.env_steps(), hung)
        if done is not None:
            event, stats = done
            self.lost_inserts += event.lost_transitions
            self._shard_stats[i] = stats

    @staticmethod
    def _raise_learner_error(status: dict) -> None:
        if status.get("diverged"):
            d = status["diverged"]
            raise FleetDiverged(d["update"], d["what"], d["message"])
        if status["error"]:
            raise FleetError(f"learner failed: {status['error']}")

    # -- the end of a run

    def stop_actors(self, timeout: float = 60.0) -> None:
        self.actors.stop(timeout)
        self.episodes.extend(self.actors.take_episodes())

    def stop_learner(self) -> dict:
        try:
            status = ray.get(self.fleet.learner.stop.remote(), timeout=CALL_TIMEOUT)
        except (RayActorError, GetTimeoutError) as exc:
            raise FleetError(f"learner died or hangs while stopping: {ray_cause(exc)}") from None
        self._raise_learner_error(status)
        return status


def _failure(answer, handle) -> tuple[str, bool]:
    """(the cause, whether it hung) of a failed component: a hung one is killed here (Ray restarts it,
    as it does a dead one; SIGKILL ends even a stopped process); a restarted one says so."""
    if isinstance(answer, Hung):
        kill_for_restart(handle)
        return answer.cause, True
    return (answer.cause if isinstance(answer, Lost) else "process died: Ray restarted it"), False
