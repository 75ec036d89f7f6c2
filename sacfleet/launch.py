"""Builds the fleet on Ray from a config and supervises it: replay shards, the learner, env actors
and an eval actor; live progress; stop on steps, wall time or Ctrl-C with a final checkpoint and
summary; a failed learner or shard stops everything, a failed env actor is restarted and counted.

The driver only steers: transitions go from actors to shards and batches from shards to the
learner without passing through it. Checkpoints and replay snapshots do come to the driver, which
writes them into the run directory, so a run on a multi-node cluster needs no shared filesystem.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import ray
import torch
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

from sacfleet.actors.env_actor import EnvActor, EvalActor
from sacfleet.common.config import Config, save_config, to_dict
from sacfleet.common.envs import describe_env
from sacfleet.common.io import atomic_write_bytes
from sacfleet.common.metrics import EpisodeStats, MetricsLogger
from sacfleet.common.plots import write_plots
from sacfleet.inline import check_run_dir, echo_flush, env_info_dict
from sacfleet.learner.checkpoint import CheckpointError, load_checkpoint, read_replay_snapshots, write_run_checkpoint
from sacfleet.learner.service import LearnerService
from sacfleet.replay_server.shard import ReplayShard

POLL_SECONDS = 0.5
CALL_TIMEOUT = 120.0  # a status call unanswered this long means the component hangs
RESTART_TIMEOUT = 120.0


class FleetError(RuntimeError):
    """The fleet stopped because a component failed; the message names the component and the cause."""


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
    must call ray.shutdown() (False when Ray was already initialised by the caller, e.g. tests)."""
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, include_dashboard=None if dashboard else False)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=dashboard)
    return True


# ------------------------------------------------------------------------------------- the fleet

@dataclass
class ActorSlot:
    """Supervision state of one env actor."""

    handle: object
    run_ref: object = None
    restarts: int = 0
    restarting_since: float | None = None
    old_pid: int | None = None
    ping_ref: object = None
    stats_ref: object = None
    last_error: str = ""
    seconds: dict = field(default_factory=dict)  # stage seconds of the current process
    seconds_before: dict = field(default_factory=dict)  # summed over processes that failed


class Fleet:
    """Handles of every Ray actor of one run, created in dependency order and killed together."""

    def __init__(self, cfg: Config, env_info, res: Resources, learner_state=None, snapshots=None,
                 faults: Mapping | None = None, session: int = 0):
        self.cfg, self.session = cfg, session
        self.handles: list = []
        shard_cls = ray.remote(ReplayShard).options(num_cpus=res.shard_cpus, max_restarts=0)
        self.shards = [self._keep(shard_cls.remote(cfg, env_info.obs_dim, env_info.act_dim, i))
                       for i in range(cfg.replay.num_shards)]
        self._ready(self.shards, "replay shard")
        if snapshots:
            refs = [shard.restore.remote(ray.put(payload)) for shard, payload in zip(self.shards, snapshots)]
            try:
                ray.get(refs)
            except RayTaskError as exc:
                raise FleetError(f"cannot restore the replay snapshots: {_first_line(exc)}") from None
        # Counters at the start of this session: the restored contents are not this session's work.
        base = ray.get([shard.stats.remote() for shard in self.shards])
        self.inserts_at_start = sum(stats["inserts"] for stats in base)
        self.samples_at_start = sum(stats["samples"] for stats in base)
        self.updates_at_start = int(learner_state["updates"]) if learner_state else 0
        learner_cls = ray.remote(LearnerService).options(
            num_cpus=res.learner_cpus, num_gpus=res.learner_gpus, max_restarts=0, max_concurrency=4)
        self.learner = self._keep(learner_cls.remote(cfg, env_info, self.shards, learner_state, faults,
                                                     res.learner_threads))
        self._ready([self.learner], "learner")
        actor_cls = ray.remote(EnvActor).options(num_cpus=res.actor_cpus, max_restarts=cfg.actors.max_restarts,
                                                 max_concurrency=2)
        peers = {"shards": self.shards, "learner": self.learner}
        self.actors = [ActorSlot(self._keep(actor_cls.remote(cfg, env_info, i, peers, faults)))
                       for i in range(cfg.actors.num)]
        eval_cls = ray.remote(EvalActor).options(num_cpus=res.eval_cpus, max_restarts=1)
        self.evaluator = self._keep(eval_cls.remote(cfg, env_info, peers))
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
            raise FleetError(f"{what} failed to start: {_first_line(exc)}") from None

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


def _first_line(exc: BaseException) -> str:
    """The cause of a Ray error without Ray's traceback banner."""
    cause = getattr(exc, "cause", None)
    if isinstance(exc, RayTaskError) and cause is not None:
        return f"{type(cause).__name__}: {cause}"
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


# ---------------------------------------------------------------------------------- supervision

@dataclass
class Counters:
    """Run totals that continue across resumed sessions."""

    env_steps_before: int = 0  # env steps of earlier sessions
    wall_before: float = 0.0
    evals: list = field(default_factory=list)  # [env_steps, wall_seconds, mean return]
    restarts_before: int = 0
    lags: list = field(default_factory=list)


class FleetRun:
    def __init__(self, cfg: Config, run_dir: Path, fleet: Fleet, env_info, counters: Counters, res: Resources,
                 echo: Callable[[str], None], start: float):
        self.cfg, self.run_dir, self.fleet, self.env_info = cfg, run_dir, fleet, env_info
        self.counters, self.res, self.echo = counters, res, echo
        self.metrics = MetricsLogger(run_dir)
        self.episodes = EpisodeStats()
        self.start = start  # the session's clock includes starting Ray and the fleet
        self.inserts_at_start, self.samples_at_start = fleet.inserts_at_start, fleet.samples_at_start
        self.updates_at_start = fleet.updates_at_start
        self.shard_stats: list[dict] = []
        self.learner_status: dict = {"updates": 0}
        self.stopping = False
        self.eval_ref = None
        self.eval_at: tuple[int, float] | None = None
        self.last_log = None

    # -- counters

    @property
    def wall(self) -> float:
        return self.counters.wall_before + time.monotonic() - self.start

    @property
    def inserts(self) -> int:
        return sum(s["inserts"] for s in self.shard_stats)

    @property
    def samples(self) -> int:
        return sum(s["samples"] for s in self.shard_stats)

    @property
    def env_steps(self) -> int:
        return self.counters.env_steps_before + self.inserts - self.inserts_at_start

    @property
    def restarts(self) -> int:
        return self.counters.restarts_before + sum(slot.restarts for slot in self.fleet.actors)

    def replay_ratio(self) -> float:
        effective = sum(s["inserts"] - s["min_size_to_sample"] for s in self.shard_stats)
        return sum(s["samples"] for s in self.shard_stats) / effective if effective > 0 else float("nan")

    def policy_lag(self) -> float:
        versions = [s["recent_policy_version"] for s in self.shard_stats if s["recent_policy_version"] >= 0]
        return self.learner_status["updates"] - sum(versions) / len(versions) if versions else float("nan")

    # -- polling

    def poll(self, read_metrics: bool = False) -> None:
        fleet = self.fleet
        try:
            self.learner_status = ray.get(fleet.learner.status.remote(read_metrics), timeout=CALL_TIMEOUT)
        except (RayActorError, GetTimeoutError) as exc:
            raise FleetError(f"learner died or hangs: {_first_line(exc)}") from None
        if self.learner_status["error"]:
            raise FleetError(f"learner failed: {self.learner_status['error']}")
        try:
            self.shard_stats = ray.get([s.stats.remote() for s in fleet.shards], timeout=CALL_TIMEOUT)
        except (RayActorError, GetTimeoutError) as exc:
            raise FleetError(f"replay shard died or hangs: {_first_line(exc)}") from None
        self._supervise_actors()
        self._collect_actor_stats()

    def _supervise_actors(self) -> None:
        if self.stopping:  # actors return from run() on purpose now
            return
        max_restarts = self.cfg.actors.max_restarts
        for i, slot in enumerate(self.fleet.actors):
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
                error, pid = _first_line(exc), getattr(exc, "pid", None)
            except ActorUnavailableError:  # restarting already; try again when it answers
                slot.restarting_since, slot.old_pid = time.monotonic(), None
                continue
            except RayActorError as exc:
                error, pid = f"process died: {_first_line(exc)}", None
            slot.restarts += 1
            slot.last_error = error
            self._fold_seconds(slot)
            if slot.restarts > max_restarts:
                raise FleetError(f"env actor {i} failed {slot.restarts} times (actors.max_restarts={max_restarts}); "
                                 f"last error: {error}")
            self.echo(f"env actor {i} failed ({error}); restarting it ({slot.restarts}/{max_restarts})")
            if pid is not None:  # the process is alive with broken state: replace it
                ray.kill(slot.handle, no_restart=False)
            slot.restarting_since, slot.old_pid, slot.ping_ref = time.monotonic(), pid, None

    def _finish_restart(self, i: int, slot: ActorSlot) -> None:
        if slot.ping_ref is None:
            slot.ping_ref = slot.handle.pid.remote()
        ready, _ = ray.wait([slot.ping_ref], timeout=0)
        if ready:
            ref, slot.ping_ref = slot.ping_ref, None
            try:
                pid = ray.get(ref)
            except (RayActorError, RayTaskError):
                pid = None
            if pid is not None and pid != slot.old_pid:
                slot.run_ref = slot.handle.run.remote(self.fleet.stream(i, slot.restarts))
                slot.restarting_since = None
                return
        if time.monotonic() - slot.restarting_since > RESTART_TIMEOUT:
            raise FleetError(f"env actor {i} did not come back within {RESTART_TIMEOUT:g} s after: {slot.last_error}")

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
                except (RayActorError, RayTaskError):
                    pass
            slot.stats_ref = None if slot.restarting_since is not None else slot.handle.stats.remote()

    # -- periodic work

    def maybe_start_eval(self, episodes: int) -> None:
        if self.eval_ref is None:
            self.eval_at = (self.env_steps, self.wall)
            self.eval_ref = self.fleet.evaluator.evaluate.remote(episodes)

    def collect_eval(self, wait: bool = False) -> dict | None:
        if self.eval_ref is None:
            return None
        ready, _ = ray.wait([self.eval_ref], timeout=None if wait else 0)
        if not ready:
            return None
        ref, self.eval_ref = self.eval_ref, None
        try:
            result = ray.get(ref)
        except (RayActorError, RayTaskError) as exc:
            raise FleetError(f"eval actor failed: {_first_line(exc)}") from None
        returns = result["returns"]
        mean = sum(returns) / len(returns)
        std = (sum((r - mean) ** 2 for r in returns) / len(returns)) ** 0.5
        steps, wall = self.eval_at
        self.counters.evals.append([steps, round(wall, 2), mean])
        self.metrics.log(steps, wall, {"eval/mean_reward": mean, "eval/std_reward": std})
        return {**result, "mean": mean, "std": std}

    def log_progress(self) -> None:
        self.poll(read_metrics=True)
        now = (self.env_steps, self.learner_status["updates"], self.inserts, self.samples, self.wall)
        last = self.last_log or (self.counters.env_steps_before, self.updates_at_start, self.inserts_at_start,
                                 self.samples_at_start, self.counters.wall_before)
        span = max(now[4] - last[4], 1e-9)
        fps = (now[0] - last[0]) / span
        updates_per_s = (now[1] - last[1]) / span
        lag = self.policy_lag()
        if math.isfinite(lag):
            self.counters.lags.append(lag)
        values = {**self.learner_status.get("metrics", {}), **self.episodes.summary(),
                  "train/n_updates": now[1], "time/fps": fps, "actors/env_steps_per_s": fps,
                  "learner/updates_per_s": updates_per_s,
                  "replay/size": sum(s["size"] for s in self.shard_stats),
                  "replay/inserts_per_s": (now[2] - last[2]) / span,
                  "replay/samples_per_s": (now[3] - last[3]) / span,
                  "replay/samples_per_insert": self.replay_ratio(),
                  "learner/policy_lag": lag, "actors/restarts": self.restarts}
        self.metrics.log(now[0], now[4], values)
        self.last_log = now
        total = self.cfg.train.total_env_steps
        parts = [f"steps {now[0]:>9,}/{total:,}", f"updates {now[1]:>9,}"]
        if "rollout/ep_rew_mean" in values:
            parts.append(f"ep_rew_mean {values['rollout/ep_rew_mean']:9.1f}")
        if self.counters.evals:
            parts.append(f"eval {self.counters.evals[-1][2]:9.1f}")
        parts += [f"{fps:6.0f} steps/s", f"{updates_per_s:6.0f} updates/s",
                  f"ratio {self.replay_ratio():6.1f}", f"lag {lag:5.1f}"]
        if self.restarts:
            parts.append(f"restarts {self.restarts}")
        parts.append(f"eta {(total - now[0]) / max(fps, 1e-9):5.0f}s" if fps > 0 else "eta     ?")
        starved = self.learner_status.get("starved_reason")
        self.echo(" | ".join(parts) + (f"\n  waiting: {starved}" if starved and now[1] == last[1] else ""))

    def checkpoint(self) -> None:
        fleet = self.fleet
        try:
            state = ray.get(fleet.learner.state.remote(), timeout=CALL_TIMEOUT)
            snapshots = (ray.get([s.snapshot.remote() for s in fleet.shards], timeout=CALL_TIMEOUT)
                         if self.cfg.checkpoint.replay else None)
        except (RayActorError, GetTimeoutError) as exc:
            raise FleetError(f"checkpoint failed: {_first_line(exc)}") from None
        extra = {"env_steps": self.env_steps, "config": to_dict(self.cfg),
                 "env_info": env_info_dict(self.env_info),
                 "fleet": {"wall_seconds": self.wall, "evals": self.counters.evals,
                           "restarts": self.restarts, "session": fleet.session, "lags": self.counters.lags[-1000:]}}
        write_run_checkpoint(self.run_dir / "checkpoints", state, extra, snapshots)

    def stage_seconds(self) -> dict[str, float]:
        actors = {}
        for slot in self.fleet.actors:
            for key in set(slot.seconds) | set(slot.seconds_before):
                actors[key] = actors.get(key, 0.0) + slot.seconds.get(key, 0.0) + slot.seconds_before.get(key, 0.0)
        s = self.learner_status
        return {"actors: env step": actors.get("env", 0.0), "actors: policy inference": actors.get("inference", 0.0),
                "actors: waiting on replay (back-pressure)": actors.get("insert_wait", 0.0),
                "learner: sample + copy (prefetch thread)": s.get("seconds_sampling", 0.0),
                "learner: SAC updates": s.get("seconds_update", 0.0),
                "learner: waiting for batches": s.get("seconds_waiting_for_data", 0.0)}


# ------------------------------------------------------------------------------------ train

def train_fleet(cfg: Config, run_dir: Path, *, address: str | None = None, resume: bool = False,
                num_cpus: int | None = None, dashboard: bool = False, echo: Callable[[str], None] | None = None,
                faults: Mapping | None = None) -> dict:
    """Train with the Ray fleet; returns the summary (also written to run_dir/summary.json).
    `faults` is for tests: {"learner_update": n} or {"env_actor_step": (actor, step)} raise there."""
    start = time.monotonic()
    echo = echo or echo_flush
    run_dir = Path(run_dir)
    counters, learner_state, snapshots, session = Counters(), None, None, 0
    if resume:
        state = load_checkpoint(run_dir)
        learner_state = state["learner"]
        prior = state.get("fleet", {})
        counters = Counters(env_steps_before=int(state["env_steps"]), wall_before=float(prior.get("wall_seconds", 0.0)),
                            evals=list(prior.get("evals", [])), restarts_before=int(prior.get("restarts", 0)),
                            lags=list(prior.get("lags", [])))
        session = int(prior.get("session", 0)) + 1
        if counters.env_steps_before >= cfg.train.total_env_steps:
            raise CheckpointError(f"the run in {run_dir} already has {counters.env_steps_before:,} env steps, "
                                  f"train.total_env_steps={cfg.train.total_env_steps:,}; raise it to continue, "
                                  f"e.g. --set train.total_env_steps={2 * cfg.train.total_env_steps}")
        if cfg.checkpoint.replay:
            snapshots = read_replay_snapshots(run_dir / "checkpoints", cfg.replay.num_shards)
    else:
        check_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    env_info = describe_env(cfg.env)
    if resume and env_info_dict(env_info)["obs_dim"] != state["env_info"]["obs_dim"]:
        raise CheckpointError(f"the checkpoint in {run_dir} is for another environment than {cfg.env.id}")

    started_ray = connect(address, num_cpus, dashboard)
    fleet = None
    try:
        res = plan_resources(cfg, ray.cluster_resources())
        echo(f"sacfleet: {cfg.env.id} obs_dim={env_info.obs_dim} act_dim={env_info.act_dim} | "
             f"{cfg.actors.num} actors x {cfg.actors.envs_per_actor} envs ({res.actor_cpus:g} CPU each), "
             f"{cfg.replay.num_shards} shards, learner {res.learner_cpus:g} CPU"
             f"{' + 1 GPU' if res.learner_gpus else ''}, cluster {res.cluster_cpus:g} CPUs"
             f"{' (joined ' + address + ')' if address else ''} | steps {cfg.train.total_env_steps:,} | run_dir {run_dir}")
        if resume:
            echo(f"resuming at {counters.env_steps_before:,} env steps, {learner_state['updates']:,} updates"
                 f"{', replay restored from snapshots' if snapshots else ', replay empty (no snapshots)'}")
        fleet = Fleet(cfg, env_info, res, learner_state, snapshots, faults, session)
        run = FleetRun(cfg, run_dir, fleet, env_info, counters, res, echo, start)
        return _supervise(run)
    finally:
        if fleet is not None:
            fleet.kill()
        if started_ray:
            ray.shutdown()


def _supervise(run: FleetRun) -> dict:
    cfg = run.cfg
    run.poll()
    restored = sum(s["restored_size"] for s in run.shard_stats)
    interval = cfg.train.log_interval
    next_log = (run.env_steps // interval + 1) * interval
    next_eval = (run.env_steps // cfg.eval.interval + 1) * cfg.eval.interval if cfg.eval.interval else math.inf
    ckpt_interval = cfg.checkpoint.interval
    next_ckpt = (run.learner_status["updates"] // ckpt_interval + 1) * ckpt_interval if ckpt_interval else math.inf
    stop_reason = "train.total_env_steps reached"
    try:
        while True:
            time.sleep(POLL_SECONDS)
            run.poll()
            run.collect_eval()
            # At the last step the final evaluation stands in for a periodic one.
            if next_eval <= run.env_steps < cfg.train.total_env_steps:
                next_eval = (run.env_steps // cfg.eval.interval + 1) * cfg.eval.interval
                run.maybe_start_eval(cfg.eval.episodes)
            if run.env_steps >= next_log:
                next_log = (run.env_steps // interval + 1) * interval
                run.log_progress()
            if run.learner_status["updates"] >= next_ckpt:
                next_ckpt = (run.learner_status["updates"] // ckpt_interval + 1) * ckpt_interval
                run.checkpoint()
            if run.env_steps >= cfg.train.total_env_steps:
                break
            if cfg.train.max_wall_seconds and run.wall - run.counters.wall_before > cfg.train.max_wall_seconds:
                stop_reason = f"train.max_wall_seconds={cfg.train.max_wall_seconds:g} reached"
                break
    except KeyboardInterrupt:
        stop_reason = "interrupted"
    run.echo(f"stopping ({stop_reason}): final evaluation, checkpoint and summary")
    return _finish(run, stop_reason, restored)


def _finish(run: FleetRun, stop_reason: str, restored: int) -> dict:
    cfg, fleet = run.cfg, run.fleet
    run.stopping = True
    for slot in fleet.actors:
        slot.handle.stop.remote()
    ray.wait([slot.run_ref for slot in fleet.actors], num_returns=len(fleet.actors), timeout=60)
    try:
        final_status = ray.get(fleet.learner.stop.remote(), timeout=CALL_TIMEOUT)
    except (RayActorError, GetTimeoutError) as exc:
        raise FleetError(f"learner died or hangs while stopping: {_first_line(exc)}") from None
    if final_status["error"]:
        raise FleetError(f"learner failed: {final_status['error']}")
    run.log_progress()
    run.collect_eval(wait=True)  # a periodic evaluation still running
    run.maybe_start_eval(cfg.eval.final_episodes)
    final = run.collect_eval(wait=True)
    run.checkpoint()
    run.metrics.close()

    wall = run.wall
    session_wall = wall - run.counters.wall_before
    stages = run.stage_seconds()
    status = run.learner_status
    session_steps = run.env_steps - run.counters.env_steps_before
    lags = run.counters.lags
    summary = {
        "env_steps": run.env_steps,
        "updates": status["updates"],
        "wall_seconds": round(wall, 2),
        "session_wall_seconds": round(session_wall, 2),
        "stop_reason": stop_reason,
        "interrupted": stop_reason == "interrupted",
        "mode": "fleet",
        "eval": {"return_mean": final["mean"], "return_std": final["std"], "episodes": len(final["returns"]),
                 "policy_version": final["version"], "curve": run.counters.evals},
        "throughput": {"env_steps_per_s": session_steps / session_wall,
                       "updates_per_s": (status["updates"] - run.updates_at_start) / session_wall,
                       "inserts_per_s": (run.inserts - run.inserts_at_start) / session_wall,
                       "samples_per_s": (run.samples - run.samples_at_start) / session_wall,
                       "weight_publishes_per_s": status["publishes"] / session_wall,
                       "stage_seconds": {k: round(v, 2) for k, v in stages.items()}},
        "replay": {"size": sum(s["size"] for s in run.shard_stats), "samples_per_insert": run.replay_ratio(),
                   "samples_per_insert_target": cfg.replay.samples_per_insert, "restored_size": restored,
                   "error_buffer_per_shard": run.shard_stats[0]["error_buffer"]},
        "policy_lag": {"mean": sum(lags) / len(lags) if lags else None, "last": lags[-1] if lags else None,
                       "unit": "learner updates between the policy that acted and the learner's current one"},
        "actors": {"num": cfg.actors.num, "envs_per_actor": cfg.actors.envs_per_actor, "restarts": run.restarts},
        "resources": asdict(run.res),
        "learner_device": fleet.device,
        "config": to_dict(cfg),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "ray": ray.__version__,
    }
    atomic_write_bytes(run.run_dir / "summary.json", json.dumps(summary, indent=2).encode())
    plots = write_plots(run.run_dir, run.counters.evals, stages, cfg.env.id)
    run.echo(f"done ({stop_reason}): {run.env_steps:,} env steps, {status['updates']:,} updates in {session_wall:.1f}s "
             f"({summary['throughput']['env_steps_per_s']:.0f} steps/s, {summary['throughput']['updates_per_s']:.0f} "
             f"updates/s, replay ratio {summary['replay']['samples_per_insert']:.1f} of "
             f"{cfg.replay.samples_per_insert:g}); eval return {final['mean']:.1f} +- {final['std']:.1f} over "
             f"{len(final['returns'])} episodes; summary {run.run_dir / 'summary.json'}"
             f"{'; plots ' + ', '.join(p.name for p in plots) if plots else ''}")
    return summary
