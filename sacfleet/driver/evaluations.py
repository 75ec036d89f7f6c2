"""Evaluations on the fleet's eval actor, seen from the driver: started on schedule, collected when
done, and run again when the actor's process dies or hangs (then it is killed) during one. The actor
holds no state, so Ray's restart is the whole recovery; each failure is counted once, also one
between evaluations."""

from __future__ import annotations

import time
from typing import Callable

import ray
from ray.exceptions import RayActorError, RayTaskError

from sacfleet.driver.calls import RESTART_TIMEOUT, Hung, Lost, PendingCalls, kill_for_restart
from sacfleet.driver.errors import FleetError, ray_cause

EVAL_TIMEOUT = 1800.0  # longest wait for an evaluation (Humanoid's 100 final episodes fit)
WATCH_EVERY_S = 1.0  # while waiting for one, the actor is watched (for a hang) this often


class Evaluations:
    """`recovery` (recovery.FleetRecovery) counts a death; `env_steps()` is the run's count, for the record."""

    def __init__(self, evaluator, calls: PendingCalls, recovery, env_steps: Callable[[], int],
                 clock: Callable[[], float] = time.monotonic):
        self.evaluator, self.calls, self.recovery, self.env_steps, self.clock = (evaluator, calls, recovery,
                                                                                 env_steps, clock)
        self.ref = None  # the evaluation running
        self.episodes = 0
        self.weights_above: float | None = None
        self.pid: int | None = None  # of the eval actor's process, to notice one that died idle
        self.down = False  # its death was counted; calls fail until Ray has restarted it
        self.down_since = 0.0
        # The evaluation that was running when a death or hang was counted: its failure, which may come
        # after the new process has answered, is not a second one.
        self.counted_ref = None

    def watch(self) -> None:
        """Count an eval actor that died between evaluations (Ray restarts it without a word, so the
        driver compares its pid), and kill one that hangs, evaluating or not (its pid is answered on a
        second thread). A death during an evaluation is handled by result()."""
        answer = self.calls.answer("evaluator", self.evaluator.pid.remote)
        if isinstance(answer, Hung):
            if self.down:  # restarting after a death: Ray holds calls until the new process serves
                self._lost(answer.cause, evaluating=self.ref is not None)  # past RESTART_TIMEOUT, stops the run
                return
            self._lost(answer.cause, evaluating=self.ref is not None, hung=True)
            kill_for_restart(self.evaluator)
        elif isinstance(answer, Lost):
            if self.ref is None:  # during an evaluation, result() sees it too and asks again
                self._lost(answer.cause, evaluating=False)
        elif answer is not None:
            if not self.down and self.pid is not None and answer != self.pid:
                self.recovery.evaluator("process died: Ray restarted it", self.env_steps(),
                                        evaluating=self.ref is not None)
                self.counted_ref = self.ref
            self.pid, self.down = answer, False

    def _lost(self, cause: str, evaluating: bool, hung: bool = False) -> None:
        """A call to the eval actor failed because its process died (or hung, and is being killed).
        Calls fail until Ray has it running again: the failure is counted once, and the pid it answers
        next is not a second one."""
        if not self.down:
            self.recovery.evaluator(cause, self.env_steps(), evaluating, hung)
            self.down, self.down_since, self.pid, self.counted_ref = True, self.clock(), None, self.ref
        elif self.clock() - self.down_since > RESTART_TIMEOUT:
            raise FleetError(f"eval actor did not come back within {RESTART_TIMEOUT:g} s")

    def start(self, episodes: int, weights_above: float | None = None) -> bool:
        """Ask for `episodes` of the newest policy, and its weights if it does better than `weights_above`;
        False if an evaluation is running already."""
        if self.ref is not None:
            return False
        self.calls.drop("evaluator")  # an answer from before the evaluation could predate a death in it
        self.ref = self.evaluator.evaluate.remote(episodes, weights_above)
        self.episodes, self.weights_above = episodes, weights_above
        return True

    def result(self, wait: bool = False) -> dict | None:
        """The running evaluation's result ({"version", "returns", "success_rate", "seconds", and "weights"
        when asked for}) once it is done; waiting at most EVAL_TIMEOUT."""
        deadline = self.clock() + EVAL_TIMEOUT
        while self.ref is not None:
            ready, _ = ray.wait([self.ref], timeout=WATCH_EVERY_S if wait else 0)
            if not ready:
                if not wait:
                    return None
                if self.clock() > deadline:
                    raise FleetError(f"eval actor hangs: an evaluation did not finish within {EVAL_TIMEOUT:g} s")
                self.watch()  # one that hangs is killed: its evaluation then fails below and runs again
                continue
            ref, self.ref = self.ref, None
            try:
                result = ray.get(ref)
                self.down = False
                return result
            except RayActorError as exc:
                # Its process died: Ray restarts it (it holds nothing to restore) and the evaluation runs again.
                if ref is not self.counted_ref:
                    self._lost(ray_cause(exc), evaluating=True)
                self.counted_ref = None
                time.sleep(0.2)  # calls fail at once while it restarts
                self.start(self.episodes, self.weights_above)
                if not wait:
                    return None
            except RayTaskError as exc:
                raise FleetError(f"eval actor failed: {ray_cause(exc)}") from None
        return None
