"""Watches a running fleet from the driver: polls the learner and the replay shards (and has a dead one
recovered), restarts failed env actors and counts them, gathers the actors' statistics, and runs
evaluations. Every failure it cannot handle becomes a FleetError naming the component."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

from sacfleet.driver.run_dir import RunFailed

CALL_TIMEOUT = 120.0  # a status call unanswered this long means the component hangs
RESTART_TIMEOUT = 120.0
EVAL_TIMEOUT = 1800.0  # longest wait for an evaluation (Humanoid's 100 final episodes fit)


class FleetError(RunFailed):
    """The fleet stopped because a component failed; the message names the component and the cause."""


class FleetDiverged(FleetError):
    """The learner's losses, gradients or parameters became non-finite; nothing of it was published
    or checkpointed after that."""

    def __init__(self, update: int, what: str, message: str):
        super().__init__(message)
        self.update, self.what = update, what


def first_line(exc: BaseException) -> str:
    """The cause of a Ray error without Ray's traceback banner."""
    cause = getattr(exc, "cause", None)
    if isinstance(exc, RayTaskError) and cause is not None:
        return f"{type(cause).__name__}: {cause}"
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


@dataclass
class ActorSlot:
    """Supervision state of one env actor."""

    handle: object
    index: int = 0  # the actor's number: its env seeds, its first shard, its name in messages
    run_ref: object = None
    restarts: int = 0
    restarting_since: float | None = None
    pid: int | None = None  # of the process running now, once its statistics have said
    old_pid: int | None = None
    ping_ref: object = None
    stats_ref: object = None
    last_error: str = ""
    insert_blocked_seconds: float = 0.0
    seconds: dict = field(default_factory=dict)  # stage seconds of the current process
    seconds_before: dict = field(default_factory=dict)  # summed over processes that failed


@dataclass
class Lost:
    """A component's process died while a call was in flight."""

    cause: str


class FleetSupervisor:
    """`fleet` holds the Ray handles (learner, shards, evaluator, actor slots); `stream(i, restarts)`
    gives a restarted actor's env-seed stream; `episodes` receives finished episodes; `recovery`
    (recovery.FleetRecovery) brings back a dead learner or shard; `env_steps()` is the run's count."""

    def __init__(self, cfg, fleet, echo: Callable[[str], None], episodes, recovery, env_steps: Callable[[], int],
                 restarts_before: int = 0):
        self.cfg, self.fleet, self.echo, self.episodes = cfg, fleet, echo, episodes
        self.recovery, self.env_steps = recovery, env_steps
        self.restarts_before = restarts_before
        self._shard_stats: dict[int, dict] = {}
        self.lost_inserts = 0  # transitions the recovered shards had after their last snapshot
        self.lost_updates = 0  # updates the recovered learner had made after the last checkpoint
        self.learner_status: dict = {"updates": 0}
        self.stopping = False
        self.eval_ref = None
        self.eval_episodes = 0
        self.eval_pid: int | None = None  # of the eval actor's process, to notice one that died idle
        self.eval_down = False  # its death was counted; calls fail until Ray has restarted it
        self.eval_down_since = 0.0
        self.pending: dict[str, tuple[object, float]] = {}  # call -> (refs in flight, when sent)
        self.retired_seconds: dict[str, float] = {}  # stage seconds of actors a scale-down retired

    # -- what the fleet has done

    @property
    def shard_stats(self) -> list[dict]:
        return [self._shard_stats[i] for i in sorted(self._shard_stats)]

    @property
    def inserts(self) -> int:
        return sum(s["inserts"] for s in self.shard_stats)

    @property
    def samples(self) -> int:
        return sum(s["samples"] for s in self.shard_stats)

    @property
    def updates(self) -> int:
        return self.learner_status["updates"]

    @property
    def restarts(self) -> int:
        return self.restarts_before + sum(slot.restarts for slot in self.fleet.actors)

    def replay_ratio(self) -> float:
        effective = sum(s["inserts"] - s["min_size_to_sample"] for s in self.shard_stats)
        return self.samples / effective if effective > 0 else float("nan")

    def policy_lag(self) -> float:
        versions = [s["recent_policy_version"] for s in self.shard_stats if s["recent_policy_version"] >= 0]
        return self.updates - sum(versions) / len(versions) if versions else float("nan")

    def stall_values(self) -> dict[str, float]:
        """How long inserts and samples have been held back without a break, for the health checks."""
        blocked = [slot.insert_blocked_seconds for slot in self.fleet.actors if slot.restarting_since is None]
        return {"actors/insert_blocked_s": max(blocked, default=0.0),
                "learner/starved_s": self.learner_status.get("starved_seconds", 0.0)}

    def stage_seconds(self) -> dict[str, float]:
        actors: dict[str, float] = dict(self.retired_seconds)
        for slot in self.fleet.actors:
            for key in set(slot.seconds) | set(slot.seconds_before):
                actors[key] = actors.get(key, 0.0) + slot.seconds.get(key, 0.0) + slot.seconds_before.get(key, 0.0)
        s = self.learner_status
        return {"actors: env step": actors.get("env", 0.0), "actors: policy inference": actors.get("inference", 0.0),
                "actors: waiting on replay (back-pressure)": actors.get("insert_wait", 0.0),
                "learner: sample + copy (prefetch thread)": s.get("seconds_sampling", 0.0),
                "learner: SAC updates": s.get("seconds_update", 0.0),
                "learner: waiting for batches": s.get("seconds_waiting_for_data", 0.0)}

    # -- polling

    def poll(self, read_metrics: bool = False, wait: bool = False) -> None:
        """Refresh the learner's status and the shards' statistics, and look after the env actors.
        Without `wait`, a component slow to answer keeps its last known values (so that the health
        checks still see the rest of the fleet, e.g. actors held back by a stuck learner) until it
        has been silent for CALL_TIMEOUT. `read_metrics` waits for a fresh status with the metrics.
        A learner or shard whose process died is recovered here (see recovery.py)."""
        fleet = self.fleet
        if read_metrics and "learner" in self.pending:  # an answer without metrics is in flight: drain it
            self._answer("learner", "learner", lambda: None, wait=True)
        status = self._answer("learner", "learner", lambda: fleet.learner.status.remote(read_metrics),
                              wait=wait or read_metrics)
        if isinstance(status, Lost) or (status is not None and status["awaiting_restore"]):
            self._recover_learner(status.cause if isinstance(status, Lost) else "process died: Ray restarted it")
        elif status is not None:
            self.learner_status = status
            self._raise_learner_error(status)
        for i, shard in enumerate(fleet.shards):
            stats = self._answer(f"shard{i}", f"replay shard {i}", shard.stats.remote,
                                 wait=wait or read_metrics or i not in self._shard_stats)
            if isinstance(stats, Lost) or (stats is not None and stats["awaiting_restore"]):
                self._recover_shard(i, stats.cause if isinstance(stats, Lost) else "process died: Ray restarted it")
            elif stats is not None:
                self._shard_stats[i] = stats
        self._watch_evaluator()
        self._supervise_actors()
        self._collect_actor_stats()

    def _watch_evaluator(self) -> None:
        """Count an eval actor that died between evaluations: Ray restarts it without a word, so
        the driver compares its pid. A death during an evaluation is handled by eval_result."""
        if self.eval_ref is not None or self.stopping:
            return  # its one thread runs evaluate(); a pid call would wait behind it
        answer = self._answer("evaluator", "eval actor", self.fleet.evaluator.pid.remote, wait=False)
        if isinstance(answer, Lost):
            self._eval_lost(answer.cause, evaluating=False)
        elif answer is not None:
            if not self.eval_down and self.eval_pid is not None and answer != self.eval_pid:
                self.recovery.evaluator("process died: Ray restarted it", self.env_steps(), evaluating=False)
            self.eval_pid, self.eval_down = answer, False

    def _eval_lost(self, cause: str, evaluating: bool) -> None:
        """A call to the eval actor failed because its process died. Calls fail until Ray has it
        running again: the death is counted once, and the pid it answers next is not a second one."""
        if not self.eval_down:
            self.recovery.evaluator(cause, self.env_steps(), evaluating)
            self.eval_down, self.eval_down_since, self.eval_pid = True, time.monotonic(), None
        elif time.monotonic() - self.eval_down_since > RESTART_TIMEOUT:
            raise FleetError(f"eval actor did not come back within {RESTART_TIMEOUT:g} s")

    def _recover_learner(self, cause: str) -> None:
        self.pending.pop("learner", None)
        done = self.recovery.learner(cause, self.updates, self.env_steps())
        if done is not None:
            event, updates = done
            self.lost_updates += event.lost_updates
            self.learner_status = {**self.learner_status, "updates": updates}

    def _recover_shard(self, i: int, cause: str) -> None:
        self.pending.pop(f"shard{i}", None)
        last = self._shard_stats.get(i, {}).get("inserts", 0)
        done = self.recovery.shard(i, cause, last, self.env_steps())
        if done is not None:
            event, stats = done
            self.lost_inserts += event.lost_transitions
            self._shard_stats[i] = stats

    def _answer(self, call: str, what: str, send: Callable[[], object], wait: bool):
        """The answer to `call` once it has come (sending it first if none is in flight), Lost if the
        component's process died, else None."""
        if call not in self.pending:
            self.pending[call] = (send(), time.monotonic())
        ref, sent = self.pending[call]
        timeout = max(0.0, CALL_TIMEOUT - (time.monotonic() - sent)) if wait else 0.0
        ready, _ = ray.wait([ref], timeout=timeout)
        if not ready:
            if time.monotonic() - sent >= CALL_TIMEOUT:
                raise FleetError(f"{what} hangs: no answer to a status call within {CALL_TIMEOUT:g} s")
            return None
        del self.pending[call]
        try:
            return ray.get(ref)
        except RayActorError as exc:
            return Lost(f"process died: {type(exc).__name__}")

    @staticmethod
    def _raise_learner_error(status: dict) -> None:
        if status.get("diverged"):
            d = status["diverged"]
            raise FleetDiverged(d["update"], d["what"], d["message"])
        if status["error"]:
            raise FleetError(f"learner failed: {status['error']}")

    def stop_learner(self) -> dict:
        try:
            status = ray.get(self.fleet.learner.stop.remote(), timeout=CALL_TIMEOUT)
        except (RayActorError, GetTimeoutError) as exc:
            raise FleetError(f"learner died or hangs while stopping: {first_line(exc)}") from None
        self._raise_learner_error(status)
        return status

    def _supervise_actors(self) -> None:
        if self.stopping:  # actors return from run() on purpose now
            return
        max_restarts = self.cfg.actors.max_restarts
        for slot in self.fleet.actors:
            i = slot.index
            if slot.restarting_since is not None:
                self._finish_restart(i, slot)
                continue
            ready, _ = ray.wait([slot.run_ref], timeout=0)
            if not ready:
                continue
            try:
                ray.get(slot.run_ref)
                error, pid = "run() returned before the fleet stopped", None
            except RayTaskError as exc:
                error, pid = first_line(exc), getattr(exc, "pid", None)
            except ActorUnavailableError as exc:  # its process died (a kill, a lost node) and Ray restarts it
                error, pid = f"process died, Ray is restarting it ({type(exc).__name__})", None
            except RayActorError as exc:
                error, pid = f"process died ({type(exc).__name__}: {first_line(exc)})", None
            slot.restarts += 1
            slot.last_error = error
            self._fold_seconds(slot)
            if slot.restarts > max_restarts:
                raise FleetError(f"env actor {i} failed {slot.restarts} times (actors.max_restarts={max_restarts}); "
                                 f"last error: {error}")
            self.echo(f"env actor {i} failed ({error}); restarting it ({slot.restarts}/{max_restarts})")
            if pid is not None:  # the process is alive with broken state: replace it
                ray.kill(slot.handle, no_restart=False)
            # The new process is the one that answers with another pid than the failed one; it gets
            # an env-seed stream of its own (fleet.stream counts restarts).
            slot.restarting_since, slot.old_pid, slot.ping_ref = time.monotonic(), pid or slot.pid, None

    def _finish_restart(self, i: int, slot: ActorSlot) -> None:
        if slot.ping_ref is None:
            slot.ping_ref = slot.handle.pid.remote()
        ready, _ = ray.wait([slot.ping_ref], timeout=0)
        if ready:
            ref, slot.ping_ref = slot.ping_ref, None
            try:
                pid = ray.get(ref)
            except (RayActorError, RayTaskError):  # not back yet (ActorUnavailableError is a RayActorError)
                pid = None
            if pid is not None and pid != slot.old_pid:
                slot.run_ref = slot.handle.run.remote(self.fleet.stream(i, slot.restarts))
                slot.restarting_since = None
                return
        if time.monotonic() - slot.restarting_since > RESTART_TIMEOUT:
            raise FleetError(f"env actor {i} did not come back within {RESTART_TIMEOUT:g} s after: {slot.last_error}")

    def retire(self, slot: ActorSlot) -> None:
        """An actor leaves the fleet (a scale-down) after it stopped: its last statistics, restarts and
        stage seconds stay in the run's totals."""
        for ref in [slot.stats_ref, slot.handle.stats.remote()]:  # the one in flight holds episodes too
            try:
                if ref is not None:
                    stats = ray.get(ref, timeout=10)
                    self.episodes.extend(stats["episodes"])
                    slot.seconds = stats["seconds"]
            except (RayActorError, RayTaskError, GetTimeoutError):
                pass
        self._fold_seconds(slot)
        for key, value in slot.seconds_before.items():
            self.retired_seconds[key] = self.retired_seconds.get(key, 0.0) + value
        self.restarts_before += slot.restarts

    @staticmethod
    def _fold_seconds(slot: ActorSlot) -> None:
        for key, value in slot.seconds.items():
            slot.seconds_before[key] = slot.seconds_before.get(key, 0.0) + value
        slot.seconds = {}

    def _collect_actor_stats(self) -> None:
        for slot in self.fleet.actors:
            if slot.stats_ref is not None:
                ready, _ = ray.wait([slot.stats_ref], timeout=0)
                if not ready:
                    continue
                try:
                    stats = ray.get(slot.stats_ref)
                    self.episodes.extend(stats["episodes"])
                    slot.seconds = stats["seconds"]
                    slot.pid = stats.get("pid")
                    slot.insert_blocked_seconds = stats["insert_blocked_seconds"]
                except (RayActorError, RayTaskError):
                    pass
            slot.stats_ref = None if slot.restarting_since is not None else slot.handle.stats.remote()

    def stop_actors(self, timeout: float = 60.0) -> None:
        self.stopping = True
        for slot in self.fleet.actors:
            slot.handle.stop.remote()
        ray.wait([slot.run_ref for slot in self.fleet.actors], num_returns=len(self.fleet.actors), timeout=timeout)
        # One that died as the fleet stopped is counted too (it is not restarted).
        for slot in self.fleet.actors:
            i = slot.index
            if slot.restarting_since is not None:
                continue  # its failure was counted when it happened
            ready, _ = ray.wait([slot.run_ref], timeout=0)
            if not ready:
                continue
            try:
                ray.get(slot.run_ref)
            except RayActorError as exc:
                slot.restarts += 1
                self.echo(f"env actor {i} failed (process died ({type(exc).__name__})) as the fleet stopped; "
                          f"not restarted ({slot.restarts}/{self.cfg.actors.max_restarts})")
            except RayTaskError:
                pass  # it failed while stopping: nothing was lost, and the run is ending

    # -- evaluations and checkpoints

    def start_eval(self, episodes: int) -> bool:
        """Ask the eval actor for `episodes` of the newest policy; False if one is running already."""
        if self.eval_ref is not None:
            return False
        self.pending.pop("evaluator", None)  # an answer from before the evaluation could predate a death in it
        self.eval_ref, self.eval_episodes = self.fleet.evaluator.evaluate.remote(episodes), episodes
        return True

    def eval_result(self, wait: bool = False) -> dict | None:
        """The running evaluation's result ({"version", "returns", "seconds"}) once it is done; waiting
        at most EVAL_TIMEOUT."""
        while self.eval_ref is not None:
            ready, _ = ray.wait([self.eval_ref], timeout=EVAL_TIMEOUT if wait else 0)
            if not ready:
                if wait:
                    raise FleetError(f"eval actor hangs: an evaluation did not finish within {EVAL_TIMEOUT:g} s")
                return None
            ref, self.eval_ref = self.eval_ref, None
            try:
                result = ray.get(ref)
                self.eval_down = False
                return result
            except RayActorError as exc:
                # Its process died: Ray restarts it (it holds nothing to restore) and the evaluation runs again.
                self._eval_lost(f"process died: {type(exc).__name__}", evaluating=True)
                time.sleep(0.2)  # calls fail at once while it restarts
                self.start_eval(self.eval_episodes)
                if not wait:
                    return None
            except RayTaskError as exc:
                raise FleetError(f"eval actor failed: {first_line(exc)}") from None
        return None
