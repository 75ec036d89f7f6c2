"""Brings a dead replay shard, learner or eval actor back inside a running fleet. Ray restarts the process (on
any node with room; the handles every peer holds stay valid); this restores what the process held
from the newest checkpoint set, counts the failure against train.max_failures, and records what was
lost: transitions inserted after the shard's last snapshot, updates made after the last checkpoint."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import ray
from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError

from sacfleet.driver.calls import RESTART_TIMEOUT
from sacfleet.driver.checkpointing import FleetCheckpointer
from sacfleet.driver.errors import FleetError, ray_cause

# A failure noticed this soon after the previous one was noticed or recovered is part of it: a lost
# node's processes are noticed one poll apart, each after the previous one's recovery.
INCIDENT_S = 5.0
DEAD_FOR_S = 5.0  # Ray may call a restarting actor dead for a moment (a lost node); this long, it is


@dataclass
class Recovery:
    component: str  # "replay shard 1" or "learner"
    cause: str
    env_steps: int  # when it failed
    seconds: float  # from noticing the failure to serving again
    lost_transitions: int = 0
    lost_updates: int = 0
    incident: int = 0  # failures of one incident (a lost node takes several processes) share it
    hung: bool = False  # it did not answer (and was killed) rather than died


class FleetRecovery:
    """`earlier`: the recoveries of a resumed run's earlier sessions (they count against the limit);
    `clock`: seconds, for the incidents and the restart deadline."""

    def __init__(self, cfg, fleet, checkpointer: FleetCheckpointer, echo: Callable[[str], None],
                 earlier: list | None = None, clock: Callable[[], float] = time.monotonic):
        self.cfg, self.fleet, self.checkpointer, self.echo, self.clock = cfg, fleet, checkpointer, echo, clock
        self.earlier = [dict(event) for event in earlier or []]
        self.events: list[Recovery] = []
        # Events saved before incidents were recorded count one each.
        self.incidents = len({e.get("incident", -1 - i) for i, e in enumerate(self.earlier)})
        self.incident_last: float | None = None  # when the current incident last saw a failure or recovery

    @property
    def failures(self) -> int:
        """Incidents so far, what train.max_failures limits: a lost node counts once however many
        fleet processes it held."""
        return self.incidents

    def totals(self) -> dict:
        events = self.earlier + [asdict(event) for event in self.events]
        return {"failures": self.failures, "recoveries": len(events), "max_failures": self.cfg.train.max_failures,
                "hung": sum(bool(e.get("hung")) for e in events),
                "lost_transitions": sum(e["lost_transitions"] for e in events),
                "lost_updates": sum(e["lost_updates"] for e in events), "events": events}

    def shard(self, index: int, cause: str, last_inserts: int, env_steps: int,
              hung: bool = False) -> tuple[Recovery, dict] | None:
        """Recover shard `index`, last seen holding `last_inserts` (and killed for a restart when it
        `hung`); returns (what happened, its new statistics), or None when the process turns out not to
        have restarted (a passing error)."""
        what, handle = f"replay shard {index}", self.fleet.shards[index]
        t0 = self.clock()
        self._count(what, cause)
        stats = self._restarted(what, cause, handle.stats.remote)
        if not stats["awaiting_restore"]:
            return None
        entry = self.checkpointer.writer.entries[index]
        source = (f"from its snapshot of {entry['inserts']:,} inserts" if entry else "empty (no snapshot yet)"
                  if self.cfg.checkpoint.replay else "empty (checkpoint.replay=false keeps no snapshots)")
        self.echo(f"{what} {_failed(cause, hung)}; recovering it ({self._budget()}) {source}")
        stats = self.checkpointer.restore_shard(index, handle, echo=self.echo)
        event = Recovery(what, cause, env_steps, self.clock() - t0,
                         lost_transitions=max(0, last_inserts - stats["inserts"]), incident=self.incidents, hung=hung)
        self._record(event)
        self.echo(f"{what} recovered in {event.seconds:.1f}s holding {stats['size']:,} transitions; lost "
                  f"{event.lost_transitions:,} inserted after its last snapshot")
        return event, stats

    def learner(self, cause: str, last_updates: int, env_steps: int, hung: bool = False) -> tuple[Recovery, int] | None:
        """Recover the learner (killed for a restart when it `hung`) from the newest checkpoint; returns
        (what happened, its update count), or None when the process turns out not to have restarted."""
        learner = self.fleet.learner
        t0 = self.clock()
        self._count("learner", cause)
        status = self._restarted("learner", cause, learner.status.remote)
        if not status["awaiting_restore"]:
            return None
        state = self.checkpointer.learner_state
        source = (f"from the checkpoint at {int(state['updates']):,} updates" if state
                  else "from its initial networks (no checkpoint yet)")
        self.echo(f"learner {_failed(cause, hung)}; recovering it ({self._budget()}) {source}")
        try:
            updates = ray.get(learner.restore.remote(state), timeout=RESTART_TIMEOUT)
            ray.get(learner.start.remote(), timeout=RESTART_TIMEOUT)
        except (RayActorError, GetTimeoutError) as exc:
            raise FleetError(f"the restarted learner failed while restoring: {ray_cause(exc)}") from None
        event = Recovery("learner", cause, env_steps, self.clock() - t0,
                         lost_updates=max(0, last_updates - updates), incident=self.incidents, hung=hung)
        self._record(event)
        self.echo(f"learner recovered in {event.seconds:.1f}s at {updates:,} updates; lost "
                  f"{event.lost_updates:,} updates made after the last checkpoint")
        return event, updates

    def evaluator(self, cause: str, env_steps: int, evaluating: bool = True, hung: bool = False) -> None:
        """The eval actor died, or hung and was killed (it holds no state): Ray restarts it, and an
        evaluation it was running is asked again."""
        self._count("eval actor", cause)
        self._record(Recovery("eval actor", cause, env_steps, 0.0, incident=self.incidents, hung=hung))
        then = ("Ray restarts it and the evaluation runs again" if evaluating
                else "it was between evaluations: Ray restarted it and nothing was lost")
        self.echo(f"eval actor {_failed(cause, hung)}; {then} ({self._budget()})")

    def _count(self, what: str, cause: str) -> None:
        """Open a new incident unless this failure belongs to the current one; past the limit, stop."""
        now = self.clock()
        if self.incident_last is None or now - self.incident_last > INCIDENT_S:
            limit = self.cfg.train.max_failures
            if self.failures >= limit:
                raise FleetError(f"{what} failed ({cause}) after the fleet had recovered from {self.failures} "
                                 f"failures (train.max_failures={limit})")
            self.incidents += 1
        self.incident_last = now

    def _record(self, event: Recovery) -> None:
        self.events.append(event)
        self.incident_last = self.clock()

    def _budget(self) -> str:
        return f"failure {self.failures}/{self.cfg.train.max_failures}"

    def _restarted(self, what: str, cause: str, call) -> dict:
        """The first answer of the component's process once Ray has it running again."""
        deadline = self.clock() + RESTART_TIMEOUT
        died_since = None
        while True:
            try:
                return ray.get(call(), timeout=max(0.1, deadline - self.clock()))
            except ActorDiedError as exc:  # out of restarts, or nowhere left to place it, once it persists
                died_since = died_since or self.clock()
                if self.clock() - died_since > DEAD_FOR_S:
                    raise FleetError(f"{what} failed ({cause}) and cannot be restarted: "
                                     f"{ray_cause(exc, detail=True)}") from None
                time.sleep(0.2)
            except RayActorError:  # still restarting
                if self.clock() > deadline:
                    break
                time.sleep(0.2)
            except GetTimeoutError:
                break
        raise FleetError(f"{what} failed ({cause}) and did not come back within {RESTART_TIMEOUT:g} s")


def _failed(cause: str, hung: bool) -> str:
    return f"hung ({cause.removeprefix('hung: ')}; killed it)" if hung else f"failed ({cause})"
