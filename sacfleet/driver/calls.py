"""The driver's calls to fleet components: what they can raise, how long an unanswered one may take
before the component counts as hung (train.hang_timeout_s; and a dead one to come back), and status
calls polled without blocking."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from sacfleet.driver.errors import ray_cause

CALL_TIMEOUT = 120.0  # the longest wait for a call outside the status polls (a learner stopping)
RESTART_TIMEOUT = 120.0  # a component whose process died and is not serving again by then stops the run
# A call fails because the component's process died (RayActorError: Ray may be restarting it), its
# method raised (RayTaskError), or it did not answer in time (GetTimeoutError).
CALL_ERRORS = (RayActorError, RayTaskError, GetTimeoutError)


@dataclass
class Lost:
    """A component's process died while a call was in flight."""

    cause: str


@dataclass
class Hung:
    """A component did not answer a call in time: as lost as a dead one, once it is killed."""

    cause: str


class PendingCalls:
    """At most one call in flight per name (a status poll of the learner, of shard 2, ...): `answer`
    sends it when none is in flight and hands back its answer once it has come, without waiting unless
    asked to. A call unanswered for `timeout` means the component hangs: Hung."""

    def __init__(self, timeout: float = CALL_TIMEOUT, clock: Callable[[], float] = time.monotonic):
        self.timeout, self.clock = timeout, clock
        self.sent: dict[str, tuple[object, float]] = {}  # name -> (ref in flight, when sent)

    def __contains__(self, name: str) -> bool:
        return name in self.sent

    def drop(self, name: str) -> None:
        """Forget the call in flight (its answer may predate a restart of the component)."""
        self.sent.pop(name, None)

    def fresh(self, name: str, send: Callable[[], object]):
        """The answer to a call sent now, waited for: a call still in flight is answered first, and
        when that shows the component lost or hung, so does this (no second wait for a second call)."""
        if name in self.sent:
            earlier = self.answer(name, send, wait=True)
            if isinstance(earlier, (Lost, Hung)):
                return earlier
        return self.answer(name, send, wait=True)

    def answer(self, name: str, send: Callable[[], object], wait: bool = False):
        """The answer to `name` once it has come (sending the call first if none is in flight), Lost
        if the component's process died, Hung if it has not answered within `timeout`, else None."""
        if name not in self.sent:
            self.sent[name] = (send(), self.clock())
        ref, sent = self.sent[name]
        # A loop: ray.wait can return a hair before its timeout, and a caller that waits waits it out.
        while not ray.wait([ref], timeout=max(0.0, sent + self.timeout - self.clock()) if wait else 0.0)[0]:
            if self.clock() - sent >= self.timeout:
                del self.sent[name]
                return Hung(f"hung: no answer to a status call within {self.timeout:g} s")
            if not wait:
                return None
        del self.sent[name]
        try:
            return ray.get(ref)
        except RayActorError as exc:
            return Lost(ray_cause(exc))


def kill_for_restart(handle) -> None:
    """Kill a hung component's process so that Ray restarts it, as it does a dead one (SIGKILL, which
    ends even a stopped process)."""
    try:
        ray.kill(handle, no_restart=False)
    except Exception:  # noqa: BLE001 - already gone: Ray restarts it or reports it dead, as for any death
        pass
