"""Builds a run's fleet on Ray: the resources each part gets, then replay shards (restored from a
checkpoint set when there is one), the learner, env actors and the eval actor, in dependency order;
killed together at the end. Shards and the learner are restarted by Ray when their process dies, so
their handles stay valid for every peer; `recovery.py` then restores what they held."""

from __future__ import annotations

import math
import os
import signal
import threading
import uuid
from dataclasses import dataclass
from typing import Mapping

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from sacfleet.actors.env_actor import EnvActor, EvalActor
from sacfleet.checkpointing import FleetCheckpointer
from sacfleet.common.config import Config
from sacfleet.common.reaper import start_reaper
from sacfleet.common.transitions import TransitionSpec
from sacfleet.learner.service import LearnerService
from sacfleet.replay_server.shard import ReplayShard
from sacfleet.supervisor import ActorSlot, FleetError, first_line

# The fleet's actors make thousands of calls a minute (inserts, samples, weight polls). Ray reports
# every one to the GCS as a task event, kept there for the dashboard's task list: in a 30-minute
# soak the GCS grew from 156 to 390 MB. Ray Serve turns them off on its actors for the same reason.
QUIET = {"enable_task_events": False}

# ----------------------------------------------------------------------------------- resources

@dataclass(frozen=True)
class Resources:
    cluster_cpus: float
    cluster_gpus: float
    learner_cpus: float
    learner_gpus: int
    shard_cpus: float
    actor_cpus: float
    eval_cpus: float
    learner_threads: int


def plan_resources(cfg: Config, cluster: Mapping[str, float]) -> Resources:
    """Fit the fleet into the cluster's CPUs: the learner gets up to half, shards and the eval actor a
    small share, and env actors split the rest (fractions, so that any actor count starts)."""
    cpus, gpus = float(cluster.get("CPU", 1)), float(cluster.get("GPU", 0))
    if cfg.learner.device == "cuda" and gpus < 1:
        raise FleetError("learner.device=cuda, but the Ray cluster has no GPU; use learner.device=auto or cpu")
    learner_gpus = 1 if cfg.learner.device in ("cuda", "auto") and gpus >= 1 else 0
    learner_cpus = min(cfg.learner.num_cpus, cpus / 2)
    shard_cpus = min(cfg.replay.num_cpus, cpus / 4 / cfg.replay.num_shards)
    eval_cpus = min(0.1, cpus / 20)
    left = cpus - learner_cpus - shard_cpus * cfg.replay.num_shards - eval_cpus
    actor_cpus = cfg.actors.num_cpus or max(0.01, min(1.0, left / cfg.actors.num))
    threads = cfg.learner.num_threads or max(1, int(learner_cpus))
    return Resources(cpus, gpus, round(learner_cpus, 4), learner_gpus, round(shard_cpus, 4),
                     math.floor(actor_cpus * 1e4) / 1e4, eval_cpus, threads)


def connect(address: str | None, num_cpus: int | None, dashboard: bool) -> bool:
    """Start an embedded Ray sized to the machine, or join `address`. Returns whether this process
    must call ray.shutdown() (False when Ray was already initialised by the caller, e.g. tests).
    An embedded Ray is watched by a reaper, so none of its processes outlives this one."""
    if ray.is_initialized():
        return False
    on_sigterm = signal.getsignal(signal.SIGTERM)
    if address:
        ray.init(address=address, include_dashboard=None if dashboard else False)
    else:
        start_reaper()
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=dashboard)
    if callable(on_sigterm) and threading.current_thread() is threading.main_thread():
        # Ray's core worker replaces the process's SIGTERM handler with one that logs and exits; the
        # caller's (the CLI's graceful stop) is put back.
        signal.signal(signal.SIGTERM, on_sigterm)
    return True


# ------------------------------------------------------------------------------------- the fleet

class Fleet:
    """Handles of every Ray actor of one run, created in dependency order and killed together."""

    def __init__(self, cfg: Config, env_info, res: Resources, checkpointer: FleetCheckpointer, learner_state=None,
                 faults: Mapping | None = None, session: int = 0):
        self.cfg, self.session = cfg, session
        self.handles: list = []
        # Ray restarts a dead shard or learner (up to train.max_failures times each) and the driver
        # restores it; env actors restart on their own budget (actors.max_restarts).
        restarts = cfg.train.max_failures
        # Peers find each other by these names (see common.process.peer_handles).
        run_id = uuid.uuid4().hex[:12]
        names = {"shards": [f"sacfleet-{run_id}-shard{i}" for i in range(cfg.replay.num_shards)],
                 "learner": f"sacfleet-{run_id}-learner"}
        self.shards = [self._keep(ray.remote(ReplayShard).options(
            name=name, num_cpus=res.shard_cpus, max_restarts=restarts, **QUIET
        ).remote(cfg, TransitionSpec.for_env(env_info), i)) for i, name in enumerate(names["shards"])]
        self._ready(self.shards, "replay shard")
        # Counters at the start of this session: the restored contents are not this session's work.
        base = [checkpointer.restore_shard(i, shard) for i, shard in enumerate(self.shards)]
        self.inserts_at_start = sum(stats["inserts"] for stats in base)
        self.samples_at_start = sum(stats["samples"] for stats in base)
        self.updates_at_start = int(learner_state["updates"]) if learner_state else 0
        learner_cls = ray.remote(LearnerService).options(
            name=names["learner"], num_cpus=res.learner_cpus, num_gpus=res.learner_gpus, max_restarts=restarts,
            max_concurrency=4, **QUIET)
        self.learner = self._keep(learner_cls.remote(
            cfg, env_info, {"shards": names["shards"]}, faults, res.learner_threads, session))
        self._ready([self.learner], "learner")
        if learner_state is not None:  # by a call: a constructor argument this large would stay in the object store
            ray.get(self.learner.restore.remote(learner_state))
        actor_cls = ray.remote(EnvActor).options(num_cpus=res.actor_cpus, max_restarts=cfg.actors.max_restarts,
                                                 max_concurrency=2, **QUIET)
        self.actors = [ActorSlot(self._keep(actor_cls.remote(cfg, env_info, i, names, faults)))
                       for i in range(cfg.actors.num)]
        eval_cls = ray.remote(EvalActor).options(num_cpus=res.eval_cpus, max_restarts=restarts, **QUIET)
        self.evaluator = self._keep(eval_cls.remote(cfg, env_info, {"learner": names["learner"]}))
        self._ready([slot.handle for slot in self.actors] + [self.evaluator], "env or eval actor")
        self.device = ray.get(self.learner.start.remote())
        for i, slot in enumerate(self.actors):
            slot.run_ref = slot.handle.run.remote(self.stream(i, 0))

    def _keep(self, handle):
        self.handles.append(handle)
        return handle

    @staticmethod
    def _ready(handles: list, what: str) -> None:
        try:
            ray.get([h.ping.remote() for h in handles], timeout=600)
        except GetTimeoutError:
            raise FleetError(f"{what} did not start within 600 s; does the cluster have the resources "
                             f"(ray status)?") from None
        except (RayActorError, RayTaskError) as exc:
            raise FleetError(f"{what} failed to start: {first_line(exc)}") from None

    def stream(self, actor: int, restarts: int) -> int:
        """Env-seed stream of an actor process: distinct per actor, restart and resumed session."""
        return actor + self.cfg.actors.num * (restarts + 1000 * self.session)

    def kill(self) -> None:
        for handle in self.handles:
            try:
                ray.kill(handle, no_restart=True)
            except Exception:  # already dead
                pass
        self.handles.clear()


