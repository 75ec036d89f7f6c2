"""Builds a run's fleet on Ray where its placement puts each part: replay shards (restored from a
checkpoint set when there is one), the learner, the env actors (a pool, env_actors.py) and the eval
actor, in dependency order, each running its class of FleetParts; killed together at the end. Shards
and the learner are restarted by Ray when their process dies, so their handles stay valid for every
peer; `recovery.py` then restores what they held."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import ray
from ray.exceptions import RayActorError, RayTaskError

from sacfleet.actors.env_actor import EnvActor, EvalActor
from sacfleet.common.config import Config
from sacfleet.common.reaper import start_reaper
from sacfleet.common.transitions import TransitionSpec
from sacfleet.driver.checkpointing import FleetCheckpointer
from sacfleet.driver.env_actors import EnvActorPool
from sacfleet.driver.errors import FleetError, ray_cause
from sacfleet.driver.placement import Placement, Resources, placement_table
from sacfleet.learner.service import LearnerService
from sacfleet.replay_server.shard import ReplayShard

# The fleet's actors make thousands of calls a minute (inserts, samples, weight polls). Ray reports
# every one to the GCS as a task event, kept there for the dashboard's task list: in a 30-minute
# soak the GCS grew from 156 to 390 MB. Ray Serve turns them off on its actors for the same reason.
QUIET = {"enable_task_events": False}
MAX_ACTORS = 10_000  # env-seed streams are numbered per actor below this
START_TIMEOUT_S = 600.0  # a part not started by then fails the run
WAIT_NOTE_S = 30.0  # how often a start that waits on Ray's placement says so


def connect(address: str | None, num_cpus: int | None, dashboard: bool, reachable: bool = False,
            log_to_driver: bool = True) -> bool:
    """Start an embedded Ray sized to the machine, or join `address`. Returns whether this process
    must call ray.shutdown() (False when Ray was already initialised by the caller, e.g. tests).
    An embedded Ray is watched by a reaper, so none of its processes outlives this one, and it listens
    on loopback only unless `reachable`: a run on one machine needs no port open to the network.
    `log_to_driver`: print the output of Ray's workers here (a sweep's trials log to files instead)."""
    if ray.is_initialized():
        return False
    on_sigterm = signal.getsignal(signal.SIGTERM)
    if address:
        ray.init(address=address, include_dashboard=None if dashboard else False, log_to_driver=log_to_driver)
    else:
        start_reaper()
        with _loopback_only(not reachable):
            ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=dashboard, log_to_driver=log_to_driver,
                     **({"dashboard_host": "0.0.0.0"} if reachable else {}))
    if callable(on_sigterm) and threading.current_thread() is threading.main_thread():
        # Ray's core worker replaces the process's SIGTERM handler with one that logs and exits; the
        # caller's (the CLI's graceful stop) is put back.
        signal.signal(signal.SIGTERM, on_sigterm)
    return True


@contextmanager
def _loopback_only(enabled: bool):
    """Ray binds its servers (GCS, raylet, workers, agents) to the node's address, which it takes to be
    the machine's network address, and `ray.init(_node_ip_address="127.0.0.1")` is turned back into that
    address. Only its single-machine mode, the default on macOS and Windows, takes loopback: switched
    on here for the processes ray.init starts (they read the variable) and for this one (whose
    constant was read at import), then put back, so that a later `connect(address)` is unaffected."""
    if not enabled:
        yield
        return
    from ray._private import ray_constants

    before_env = os.environ.get(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR)
    before = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before
        if before_env is None:
            os.environ.pop(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, None)
        else:
            os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = before_env


# ------------------------------------------------------------------------------------- the fleet

@dataclass(frozen=True)
class FleetParts:
    """The classes the fleet hosts in Ray actors, one per kind of part (as an Acme builder makes each
    component): what runs, not how it is placed or supervised. Tests pass their own, e.g. a learner
    whose update fails, to see the fleet handle it; the class names are what `sacfleet chaos` targets."""

    shard: type = ReplayShard
    learner: type = LearnerService
    env_actor: type = EnvActor
    evaluator: type = EvalActor


class Fleet:
    """Handles of every Ray actor of one run, created in dependency order and killed together."""

    def __init__(self, cfg: Config, env_info, res: Resources, placement: Placement, checkpointer: FleetCheckpointer,
                 learner_state=None, session: int = 0, echo: Callable[[str], None] = print,
                 parts: FleetParts = FleetParts()):
        self.cfg, self.env_info, self.res, self.placement, self.echo = cfg, env_info, res, placement, echo
        self.session, self.parts = session, parts
        self.handles: list = []
        try:
            self._build(checkpointer, learner_state)
        except BaseException:  # nothing of a fleet that failed to start outlives it, on a shared cluster too
            self.kill()
            raise

    def _build(self, checkpointer: FleetCheckpointer, learner_state) -> None:
        cfg, env_info, res, placement, parts, session = (self.cfg, self.env_info, self.res, self.placement,
                                                         self.parts, self.session)
        # Ray restarts a dead shard or learner (up to train.max_failures times each) and the driver
        # restores it; env actors restart on their own budget (actors.max_restarts).
        restarts = cfg.train.max_failures
        # Peers find each other by these names (see common.process.peer_handles).
        run_id = uuid.uuid4().hex[:12]
        self.names = names = {"shards": [f"sacfleet-{run_id}-shard{i}" for i in range(cfg.replay.num_shards)],
                              "learner": f"sacfleet-{run_id}-learner"}
        where = placement.strategy
        self.shards = [self._keep(ray.remote(parts.shard).options(
            name=name, num_cpus=res.shard_cpus, max_restarts=restarts, **where(f"shard {i}"), **QUIET
        ).remote(cfg, TransitionSpec.for_env(env_info), i)) for i, name in enumerate(names["shards"])]
        wait_started(self.shards, "replay shard", self.echo)
        # Counters at the start of this session: the restored contents are not this session's work.
        base = [checkpointer.restore_shard(i, shard) for i, shard in enumerate(self.shards)]
        self.inserts_at_start = sum(stats["inserts"] for stats in base)
        self.samples_at_start = sum(stats["samples"] for stats in base)
        self.updates_at_start = int(learner_state["updates"]) if learner_state else 0
        learner_cls = ray.remote(parts.learner).options(
            name=names["learner"], num_cpus=res.learner_cpus, num_gpus=res.learner_gpus, max_restarts=restarts,
            max_concurrency=4, **where("learner"), **QUIET)
        self.learner = self._keep(learner_cls.remote(
            cfg, env_info, {"shards": names["shards"]}, res.learner_threads, session))
        wait_started([self.learner], "learner", self.echo)
        if learner_state is not None:  # by a call: a constructor argument this large would stay in the object store
            ray.get(self.learner.restore.remote(learner_state))
        self.actors = EnvActorPool(self.new_env_actor, self.stream, cfg.actors.max_restarts, self.echo,
                                   hang_timeout=cfg.train.hang_timeout_s)
        slots = self.actors.create(range(cfg.actors.num))
        # Two threads: its pid is asked while it evaluates, so that one that hangs mid-evaluation is noticed.
        eval_cls = ray.remote(parts.evaluator).options(num_cpus=res.eval_cpus, max_restarts=restarts,
                                                 max_concurrency=2, **where("eval"), **QUIET)
        self.evaluator = self._keep(eval_cls.remote(cfg, env_info, {"learner": names["learner"]}))
        wait_started([slot.handle for slot in slots] + [self.evaluator], "env or eval actor", self.echo)
        self.device = ray.get(self.learner.start.remote())
        self.actors.launch(slots)

    def new_env_actor(self, index: int):
        """The Ray actor of env actor `index`, where it is planned (placement.place it first)."""
        return self._keep(ray.remote(self.parts.env_actor).options(
            num_cpus=self.res.actor_cpus, max_restarts=self.cfg.actors.max_restarts, max_concurrency=2,
            **self.placement.strategy(f"actor {index}"), **QUIET).remote(self.cfg, self.env_info, index, self.names))

    def where(self) -> list[dict]:
        """The placement as it is: each node and the parts running there (asked of the parts themselves,
        as Ray may have placed one elsewhere than planned)."""
        return placement_table(self.placement.nodes, self.ask("node"))

    def placement_groups(self) -> dict[str, str | None]:
        """Each part and the placement group it runs in, as the part itself says."""
        return self.ask("placement_group")

    def ask(self, call: str) -> dict:
        """{part: its answer} to `call`, one of the ProcessIdentity calls every part answers."""
        parts = {"learner": self.learner, "eval": self.evaluator,
                 **{f"shard {i}": shard for i, shard in enumerate(self.shards)},
                 **{f"actor {slot.index}": slot.handle for slot in self.actors}}
        return dict(zip(parts, ray.get([getattr(h, call).remote() for h in parts.values()], timeout=60)))

    def _keep(self, handle):
        self.handles.append(handle)
        return handle

    def stream(self, actor: int, restarts: int) -> int:
        """Env-seed stream of an actor process: distinct per actor (up to MAX_ACTORS, counting those a
        scale-up adds), restart and resumed session."""
        return actor + MAX_ACTORS * (restarts + 1000 * self.session)

    def kill(self) -> None:
        for handle in self.handles:
            try:
                ray.kill(handle, no_restart=True)
            except Exception:  # already dead
                pass
        self.handles.clear()




def wait_started(handles: list, what: str, echo: Callable[[str], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
    """Wait until every one of `handles` (Ray actors of one kind, `what`) answers; says every WAIT_NOTE_S
    what it still waits for (a cluster that other work keeps busy can leave a planned part unplaced),
    and gives up after START_TIMEOUT_S."""
    pings, start = [h.ping.remote() for h in handles], clock()
    try:
        while True:
            # Clamped: the deadline may pass between the check below and this line, and Ray refuses a
            # negative timeout.
            timeout = max(0.0, min(WAIT_NOTE_S, START_TIMEOUT_S - (clock() - start)))
            pending = ray.wait(pings, num_returns=len(pings), timeout=timeout)[1]
            ray.get([p for p in pings if p not in pending])  # raises a failed start
            if not pending:
                return
            waited = clock() - start
            if waited >= START_TIMEOUT_S:
                raise FleetError(f"{len(pending)} {what}(s) did not start within {START_TIMEOUT_S:g} s: Ray has "
                                 f"not placed them; is other work holding the cluster's CPUs (ray status)?")
            echo(f"waiting for {len(pending)} of {len(pings)} {what}(s) to start ({waited:.0f} s): Ray "
                 f"has not placed them yet; other work may hold the planned CPUs (ray status)")
    except (RayActorError, RayTaskError) as exc:
        raise FleetError(f"{what} failed to start: {ray_cause(exc, detail=True)}") from None
