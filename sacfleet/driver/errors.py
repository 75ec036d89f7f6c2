"""The driver's vocabulary of failure: how a run fails (RunFailed, FleetError, FleetDiverged), and what
a Ray error says happened to the component behind it (`ray_cause`)."""

from __future__ import annotations


class RunFailed(RuntimeError):
    """A run stopped before its end because something failed; the message names what and why."""


class RunStopped(RunFailed):
    """A run stopped early but in order (its final evaluation and summary written where possible)
    because something it needs kept failing, e.g. writing checkpoints to a full disk."""


class RunRefused(RuntimeError):
    """A run or command did not start because what it was given does not hold: its run directory, its
    checkpoint, the memory its replay would need; the message names the file or key. (A config key's
    own errors are common.config.ConfigError.)"""


class FleetError(RunFailed):
    """The fleet stopped because a component failed; the message names the component and the cause."""


class FleetDiverged(FleetError):
    """The learner's losses, gradients or parameters became non-finite; nothing of it was published
    or checkpointed after that."""

    def __init__(self, update: int, what: str, message: str):
        super().__init__(message)
        self.update, self.what = update, what


def ray_cause(exc: BaseException, detail: bool = False) -> str:
    """What a failed call to a fleet component says happened, without Ray's traceback banner: the
    exception its method or constructor raised ("ValueError: ..."), that its process died ("process
    died: ActorDiedError", with Ray's last word on why when `detail`), or that it did not answer in time."""
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

    lines = str(exc).strip().splitlines()
    last = lines[-1].strip() if lines else type(exc).__name__
    cause = getattr(exc, "cause", None)
    if isinstance(exc, RayTaskError) and cause is not None:
        return f"{type(cause).__name__}: {cause}"
    if isinstance(exc, RayActorError):
        if getattr(exc, "actor_init_failed", False):
            return f"its constructor raised {last}"
        return f"process died: {type(exc).__name__}" + (f" ({last})" if detail else "")
    if isinstance(exc, GetTimeoutError):
        return "no answer in time"
    return last
