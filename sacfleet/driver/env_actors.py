"""The fleet's env actors seen from the driver: a pool of slots whose actors are started, watched and
restarted when they fail or hang (counted against actors.max_restarts), whose statistics are
collected, and which are stopped at the end of a run or retired by a scale-down, their work kept in
the run's totals."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import ray
from ray.exceptions import RayActorError, RayTaskError

from sacfleet.driver.calls import CALL_ERRORS, RESTART_TIMEOUT, kill_for_restart
from sacfleet.driver.errors import FleetError, ray_cause


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
    stats_sent: float = 0.0  # when stats_ref was asked
    steps: int = -1  # env steps of the current process, as its statistics last said
    stepped_at: float | None = None  # when they last grew (or the actor was held back by replay)
    hung: int = 0  # restarts that were of a hung process
    last_error: str = ""
    insert_blocked_seconds: float = 0.0
    seconds: dict = field(default_factory=dict)  # stage seconds of the current process
    seconds_before: dict = field(default_factory=dict)  # summed over processes that failed

    def fold_seconds(self) -> None:
        """The current process's stage seconds join those of earlier ones (it failed or stopped)."""
        for key, value in self.seconds.items():
            self.seconds_before[key] = self.seconds_before.get(key, 0.0) + value
        self.seconds = {}


class EnvActorPool:
    """`new_actor(index)` starts the Ray actor of slot `index`; `stream(index, restarts)` is the env-seed
    stream its run() gets, new for each restart. Finished episodes gathered from the actors wait in
    `take_episodes()`."""

    def __init__(self, new_actor: Callable[[int], object], stream: Callable[[int, int], int], max_restarts: int,
                 echo: Callable[[str], None], clock: Callable[[], float] = time.monotonic,
                 hang_timeout: float = 30.0):
        self.new_actor, self.stream, self.max_restarts, self.echo, self.clock = (new_actor, stream, max_restarts,
                                                                                 echo, clock)
        self.hang_timeout = hang_timeout
        self.slots: list[ActorSlot] = []
        self.stopping = False
        self.restarts_before = 0  # of retired actors, and of a resumed run's earlier sessions
        self.retired_seconds: dict[str, float] = {}  # stage seconds of retired actors
        self.episodes: list = []

    def __len__(self) -> int:
        return len(self.slots)

    def __iter__(self) -> Iterator[ActorSlot]:
        return iter(self.slots)

    # -- joining and leaving

    def create(self, indices) -> list[ActorSlot]:
        """New actors for slots `indices`, not yet running or in the pool: the caller waits for them to
        start, then launch()es them, or discard()s them."""
        return [ActorSlot(self.new_actor(i), index=i) for i in indices]

    def launch(self, slots: list[ActorSlot]) -> None:
        for slot in slots:
            slot.run_ref = slot.handle.run.remote(self.stream(slot.index, 0))
        self.slots.extend(slots)

    @staticmethod
    def discard(slots: list[ActorSlot]) -> None:
        for slot in slots:
            ray.kill(slot.handle, no_restart=True)

    def retire(self, count: int, timeout: float) -> list[ActorSlot]:
        """Take the newest `count` actors out: each stops after pushing what it holds, and what it did
        (restarts, stage seconds, finished episodes) stays in the pool's totals; returns their slots."""
        retiring = self.slots[-count:]
        del self.slots[-count:]
        for slot in retiring:
            slot.handle.stop.remote()
        ray.wait([slot.run_ref for slot in retiring], num_returns=len(retiring), timeout=timeout)
        for slot in retiring:
            for ref in [slot.stats_ref, slot.handle.stats.remote()]:  # the one in flight holds episodes too
                try:
                    if ref is not None:
                        self._take_stats(slot, ray.get(ref, timeout=10))
                except CALL_ERRORS:
                    pass
            slot.fold_seconds()
            for key, value in slot.seconds_before.items():
                self.retired_seconds[key] = self.retired_seconds.get(key, 0.0) + value
            self.restarts_before += slot.restarts
            ray.kill(slot.handle, no_restart=True)
        return retiring

    # -- watching

    @property
    def restarts(self) -> int:
        return self.restarts_before + sum(slot.restarts for slot in self.slots)

    @property
    def hung(self) -> int:
        return sum(slot.hung for slot in self.slots)

    def supervise(self) -> None:
        """Restart each actor whose run() ended (its process died, or it raised), or that hangs (it
        leaves a statistics call unanswered, or takes no env step while not held back by replay, for
        train.hang_timeout_s: killed first), and finish restarts under way. Past actors.max_restarts,
        or a restart that does not come back, stops the run."""
        if self.stopping:  # actors return from run() on purpose now
            return
        for slot in self.slots:
            if slot.restarting_since is not None:
                self._finish_restart(slot)
                continue
            hang = self._hang(slot)
            if hang:
                kill_for_restart(slot.handle)
                self._failed(slot, f"hung: {hang}", None, hung=True)
                continue
            ready, _ = ray.wait([slot.run_ref], timeout=0)
            if not ready:
                continue
            pid = None
            try:
                ray.get(slot.run_ref)
                error = "run() returned before the fleet stopped"
            except (RayActorError, RayTaskError) as exc:
                error = ray_cause(exc)
                if isinstance(exc, RayTaskError):  # the process is alive with broken state
                    pid = getattr(exc, "pid", None)
            if pid is not None:  # replace the process
                ray.kill(slot.handle, no_restart=False)
            self._failed(slot, error, pid)

    def _hang(self, slot: ActorSlot) -> str | None:
        """Why the slot's process counts as hung, if it does. An answer that has come counts however late
        it is taken: the driver itself may have been busy (a recovery, a checkpoint)."""
        limit = self.hang_timeout
        if (slot.stats_ref is not None and self.clock() - slot.stats_sent > limit
                and not ray.wait([slot.stats_ref], timeout=0)[0]):
            return f"no answer to a statistics call within {limit:g} s"
        return None

    def _failed(self, slot: ActorSlot, error: str, pid: int | None, hung: bool = False) -> None:
        """Count the failure and have the slot wait for its new process."""
        slot.restarts += 1
        slot.hung += hung
        slot.last_error = error
        slot.fold_seconds()
        if slot.restarts > self.max_restarts:
            raise FleetError(f"env actor {slot.index} failed {slot.restarts} times (actors.max_restarts="
                             f"{self.max_restarts}); last error: {error}")
        what = f"hung ({error.removeprefix('hung: ')}; killed it)" if hung else f"failed ({error})"
        self.echo(f"env actor {slot.index} {what}; restarting it ({slot.restarts}/{self.max_restarts})")
        # The new process is the one that answers with another pid than the failed one; it gets
        # an env-seed stream of its own (stream counts restarts).
        slot.restarting_since, slot.old_pid, slot.ping_ref = self.clock(), pid or slot.pid, None
        slot.stats_ref, slot.steps, slot.stepped_at = None, -1, None

    def _finish_restart(self, slot: ActorSlot) -> None:
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
                slot.run_ref = slot.handle.run.remote(self.stream(slot.index, slot.restarts))
                slot.restarting_since = None
                return
        if self.clock() - slot.restarting_since > RESTART_TIMEOUT:
            raise FleetError(f"env actor {slot.index} did not come back within {RESTART_TIMEOUT:g} s after: "
                             f"{slot.last_error}")

    def collect(self) -> None:
        """Take in the statistics that have come (episodes, stage seconds, back-pressure) and ask for
        the next ones; never waits."""
        for slot in self.slots:
            if slot.stats_ref is not None:
                ready, _ = ray.wait([slot.stats_ref], timeout=0)
                if not ready:
                    continue
                try:
                    stats = ray.get(slot.stats_ref)
                    self._take_stats(slot, stats)
                    slot.pid = stats.get("pid")
                    slot.insert_blocked_seconds = stats["insert_blocked_seconds"]
                    if stats["steps"] != slot.steps or stats.get("held_back"):
                        slot.steps, slot.stepped_at = stats["steps"], self.clock()
                    elif (not self.stopping and slot.stepped_at is not None
                          and self.clock() - slot.stepped_at > self.hang_timeout):
                        # Fresh statistics, the same steps: it answers, but its env loop is stuck.
                        kill_for_restart(slot.handle)
                        self._failed(slot, f"hung: no env step for {self.hang_timeout:g} s while not held back "
                                           f"by replay", None, hung=True)
                        continue
                except (RayActorError, RayTaskError):
                    pass
            if slot.restarting_since is None:
                slot.stats_ref, slot.stats_sent = slot.handle.stats.remote(), self.clock()
            else:
                slot.stats_ref = None

    def _take_stats(self, slot: ActorSlot, stats: dict) -> None:
        self.episodes.extend(stats["episodes"])
        slot.seconds = stats["seconds"]

    def take_episodes(self) -> list:
        """(return, length, success) of the episodes finished since the last call."""
        episodes, self.episodes = self.episodes, []
        return episodes

    def insert_blocked_seconds(self) -> float:
        """How long the most held-back running actor has waited for an insert, for the health checks."""
        return max((slot.insert_blocked_seconds for slot in self.slots if slot.restarting_since is None),
                   default=0.0)

    def stage_seconds(self) -> dict[str, float]:
        """Seconds in each stage (env, inference, insert_wait), summed over every process of the run."""
        total: dict[str, float] = dict(self.retired_seconds)
        for slot in self.slots:
            for key in set(slot.seconds) | set(slot.seconds_before):
                total[key] = total.get(key, 0.0) + slot.seconds.get(key, 0.0) + slot.seconds_before.get(key, 0.0)
        return total

    def stop(self, timeout: float = 60.0) -> None:
        """Ask every actor to stop after what it holds, wait for them (at most `timeout`, and at most
        train.hang_timeout_s), and count one that died as the fleet stopped, or that hung: silent for
        train.hang_timeout_s, it is killed (a shorter `timeout`, a failing run's, judges nobody). Neither
        is restarted."""
        self.stopping = True
        for slot in self.slots:
            slot.handle.stop.remote()
        ray.wait([slot.run_ref for slot in self.slots], num_returns=len(self.slots),
                 timeout=min(timeout, self.hang_timeout))
        for slot in self.slots:
            if slot.restarting_since is not None:
                continue  # its failure was counted when it happened
            ready, _ = ray.wait([slot.run_ref], timeout=0)
            if not ready:
                if timeout >= self.hang_timeout:
                    ray.kill(slot.handle, no_restart=True)
                    slot.restarts += 1
                    slot.hung += 1
                    self.echo(f"env actor {slot.index} hung (did not stop within {self.hang_timeout:g} s; killed "
                              f"it) as the fleet stopped; not restarted ({slot.restarts}/{self.max_restarts})")
                continue
            try:
                ray.get(slot.run_ref)
            except RayActorError as exc:
                slot.restarts += 1
                self.echo(f"env actor {slot.index} failed ({ray_cause(exc)}) as the fleet stopped; "
                          f"not restarted ({slot.restarts}/{self.max_restarts})")
            except RayTaskError:
                pass  # it failed while stopping: nothing was lost, and the run is ending
