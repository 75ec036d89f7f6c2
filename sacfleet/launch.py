"""Builds the fleet on Ray from a config and runs it to its end: replay shards, the learner, env
actors and an eval actor; progress, evaluations and checkpoints on schedule; a stop on steps, wall
time or Ctrl-C with a final evaluation, checkpoint and summary. `supervisor.py` watches the running
fleet, `report.py` says what it sees, `resume.py` checks what a resumed run continues from.

The driver only steers: transitions go from actors to shards and batches from shards to the
learner without passing through it. Checkpoints and replay snapshots do come to the driver, which
writes them into the run directory, so a run on a multi-node cluster needs no shared filesystem.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from sacfleet.actors.env_actor import EnvActor, EvalActor
from sacfleet.common.config import Config, save_config, to_dict
from sacfleet.common.envs import EnvInfo, check_env_config, describe_env
from sacfleet.common.plots import write_plots
from sacfleet.common.rundir import check_run_dir, echo_flush
from sacfleet.common.transitions import TransitionSpec
from sacfleet.learner.checkpoint import kept_checkpoint_note, write_run_checkpoint
from sacfleet.learner.service import LearnerService
from sacfleet.replay_server.shard import ReplayShard
from sacfleet.report import Point, Reporter, her_values, success_note
from sacfleet.resume import ResumePoint, load_resume
from sacfleet.supervisor import ActorSlot, FleetDiverged, FleetError, FleetSupervisor, first_line

__all__ = ["FleetError", "Resources", "connect", "plan_resources", "train_fleet"]

POLL_SECONDS = 0.5


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

class Fleet:
    """Handles of every Ray actor of one run, created in dependency order and killed together."""

    def __init__(self, cfg: Config, env_info, res: Resources, learner_state=None, snapshots=None,
                 faults: Mapping | None = None, session: int = 0):
        self.cfg, self.session = cfg, session
        self.handles: list = []
        shard_cls = ray.remote(ReplayShard).options(num_cpus=res.shard_cpus, max_restarts=0)
        self.shards = [self._keep(shard_cls.remote(cfg, TransitionSpec.for_env(env_info), i))
                       for i in range(cfg.replay.num_shards)]
        self._ready(self.shards, "replay shard")
        if snapshots:
            refs = [shard.restore.remote(ray.put(payload)) for shard, payload in zip(self.shards, snapshots)]
            try:
                ray.get(refs)
            except RayTaskError as exc:
                raise FleetError(f"cannot restore the replay snapshots: {first_line(exc)}") from None
        # Counters at the start of this session: the restored contents are not this session's work.
        base = ray.get([shard.stats.remote() for shard in self.shards])
        self.inserts_at_start = sum(stats["inserts"] for stats in base)
        self.samples_at_start = sum(stats["samples"] for stats in base)
        self.updates_at_start = int(learner_state["updates"]) if learner_state else 0
        learner_cls = ray.remote(LearnerService).options(
            num_cpus=res.learner_cpus, num_gpus=res.learner_gpus, max_restarts=0, max_concurrency=4)
        self.learner = self._keep(learner_cls.remote(cfg, env_info, self.shards, learner_state, faults,
                                                     res.learner_threads, session))
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


# ------------------------------------------------------------------------------------ a run

class FleetRun:
    """One session of a run: the fleet, its supervisor and reporter, and the totals that continue
    across resumed sessions."""

    def __init__(self, cfg: Config, run_dir: Path, fleet: Fleet, env_info: EnvInfo, res: Resources,
                 resume: ResumePoint | None, echo: Callable[[str], None], start: float):
        self.cfg, self.run_dir, self.fleet, self.res, self.echo = cfg, run_dir, fleet, res, echo
        self.start = start  # the session's clock includes starting Ray and the fleet
        self.env_info = env_info
        self.env_steps_before = resume.env_steps if resume else 0
        self.wall_before = resume.wall_seconds if resume else 0.0
        self.lags: list = list(resume.lags) if resume else []
        self.session_start = Point(self.env_steps_before, fleet.updates_at_start, self.wall_before,
                                   fleet.inserts_at_start, fleet.samples_at_start)
        self.reporter = Reporter(cfg, run_dir, echo, act_dim=env_info.act_dim, fleet=True,
                                 start=self.session_start, evals=resume.evals if resume else None)
        self.supervisor = FleetSupervisor(cfg, fleet, echo, self.reporter.episodes,
                                          restarts_before=resume.restarts if resume else 0)
        self.eval_at: tuple[int, float] | None = None

    @property
    def wall(self) -> float:
        return self.wall_before + time.monotonic() - self.start

    @property
    def env_steps(self) -> int:
        return self.env_steps_before + self.supervisor.inserts - self.fleet.inserts_at_start

    def point(self) -> Point:
        sup = self.supervisor
        return Point(self.env_steps, sup.updates, self.wall, sup.inserts, sup.samples)

    def log_progress(self) -> None:
        sup = self.supervisor
        sup.poll(read_metrics=True)
        lag = sup.policy_lag()
        if math.isfinite(lag):
            self.lags.append(lag)
        now = self.point()
        values = {**sup.learner_status.get("metrics", {}),
                  "replay/size": sum(s["size"] for s in sup.shard_stats),
                  "replay/samples_per_insert": sup.replay_ratio(), "learner/policy_lag": lag,
                  "actors/restarts": sup.restarts, **sup.stall_values(), **her_values(sup.shard_stats)}
        starved = sup.learner_status.get("starved_reason")
        note = f"\n  waiting: {starved}" if starved and now.updates == self.reporter.last.updates else ""
        self.reporter.progress(now, values, note)

    def start_eval(self, episodes: int) -> None:
        if self.supervisor.start_eval(episodes):
            self.eval_at = (self.env_steps, self.wall)

    def collect_eval(self, wait: bool = False) -> dict | None:
        result = self.supervisor.eval_result(wait)
        if result is None:
            return None
        mean, std = self.reporter.evaluation(*self.eval_at, result["returns"], result.get("success_rate"))
        return {**result, "mean": mean, "std": std}

    def checkpoint(self) -> None:
        state, snapshots = self.supervisor.checkpoint_state()
        extra = {"env_steps": self.env_steps, "config": to_dict(self.cfg), "env_info": self.env_info.to_dict(),
                 "fleet": {"wall_seconds": self.wall, "evals": self.reporter.evals,
                           "restarts": self.supervisor.restarts, "session": self.fleet.session,
                           "lags": self.lags[-1000:]}}
        write_run_checkpoint(self.run_dir / "checkpoints", state, extra, snapshots)


# ------------------------------------------------------------------------------------ train

def train_fleet(cfg: Config, run_dir: Path, *, address: str | None = None, resume: bool = False,
                num_cpus: int | None = None, dashboard: bool = False, echo: Callable[[str], None] | None = None,
                faults: Mapping | None = None) -> dict:
    """Train with the Ray fleet; returns the summary (also written to run_dir/summary.json). Raises
    FleetError naming the failed component (FleetDiverged when the learner diverged: then
    summary.json says so and the last good checkpoint is kept).
    `faults` is for tests: {"learner_update": n} or {"env_actor_step": (actor, step)} raise there."""
    start = time.monotonic()
    echo = echo or echo_flush
    run_dir = Path(run_dir)
    env_info = describe_env(cfg.env)
    check_env_config(cfg, env_info)
    # Everything a resume needs is checked before the run directory changes.
    point = load_resume(run_dir, cfg, env_info) if resume else None
    if not resume:
        check_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")

    started_ray = connect(address, num_cpus, dashboard)
    fleet = None
    try:
        res = plan_resources(cfg, ray.cluster_resources())
        echo(f"sacfleet: {cfg.env.id} obs_dim={env_info.obs_dim} act_dim={env_info.act_dim} | "
             f"{cfg.actors.num} actors x {cfg.actors.envs_per_actor} envs ({res.actor_cpus:g} CPU each), "
             f"{cfg.replay.num_shards} shards, learner {res.learner_cpus:g} CPU"
             f"{' + 1 GPU' if res.learner_gpus else ''}, cluster {res.cluster_cpus:g} CPUs"
             f"{' (joined ' + address + ')' if address else ''} | steps {cfg.train.total_env_steps:,} | run_dir {run_dir}")
        if point:
            echo(f"resuming at {point.env_steps:,} env steps, {point.learner_state['updates']:,} updates"
                 f"{', replay restored from snapshots' if point.snapshots else ', replay empty (no snapshots)'}")
            if point.applied:
                echo(f"resume applies: {'; '.join(point.applied)}")
        fleet = Fleet(cfg, env_info, res, point.learner_state if point else None, point.snapshots if point else None,
                      faults, point.session if point else 0)
        run = FleetRun(cfg, run_dir, fleet, env_info, res, point, echo, start)
        try:
            return _supervise(run)
        except FleetDiverged as exc:
            # Stop at once: nothing diverged was published or saved; say so where the run's outputs are.
            run.reporter.diverged(run.point(), exc.update, exc.what, str(exc), mode="fleet")
            note = kept_checkpoint_note(run_dir / "checkpoints")
            raise FleetDiverged(exc.update, exc.what, f"{exc}; {note}") from None
    finally:
        if fleet is not None:
            fleet.kill()
        if started_ray:
            ray.shutdown()


def _supervise(run: FleetRun) -> dict:
    cfg, sup = run.cfg, run.supervisor
    sup.poll(wait=True)
    restored = sum(s["restored_size"] for s in sup.shard_stats)
    interval = cfg.train.log_interval
    next_log = (run.env_steps // interval + 1) * interval
    next_eval = (run.env_steps // cfg.eval.interval + 1) * cfg.eval.interval if cfg.eval.interval else math.inf
    ckpt_interval = cfg.checkpoint.interval
    next_ckpt = (sup.updates // ckpt_interval + 1) * ckpt_interval if ckpt_interval else math.inf
    stop_reason = "train.total_env_steps reached"
    try:
        while True:
            time.sleep(POLL_SECONDS)
            sup.poll()
            run.reporter.watch(run.point(), sup.stall_values())
            run.collect_eval()
            # At the last step the final evaluation stands in for a periodic one.
            if next_eval <= run.env_steps < cfg.train.total_env_steps:
                next_eval = (run.env_steps // cfg.eval.interval + 1) * cfg.eval.interval
                run.start_eval(cfg.eval.episodes)
            if run.env_steps >= next_log:
                next_log = (run.env_steps // interval + 1) * interval
                run.log_progress()
            if sup.updates >= next_ckpt:
                next_ckpt = (sup.updates // ckpt_interval + 1) * ckpt_interval
                run.checkpoint()
            if run.env_steps >= cfg.train.total_env_steps:
                break
            if cfg.train.max_wall_seconds and run.wall - run.wall_before > cfg.train.max_wall_seconds:
                stop_reason = f"train.max_wall_seconds={cfg.train.max_wall_seconds:g} reached"
                break
    except KeyboardInterrupt:
        stop_reason = "interrupted"
    run.echo(f"stopping ({stop_reason}): final evaluation, checkpoint and summary")
    return _finish(run, stop_reason, restored)


def _finish(run: FleetRun, stop_reason: str, restored: int) -> dict:
    cfg, fleet, sup = run.cfg, run.fleet, run.supervisor
    sup.stop_actors()
    final_status = sup.stop_learner()
    run.log_progress()
    run.collect_eval(wait=True)  # a periodic evaluation still running
    run.start_eval(cfg.eval.final_episodes)
    final = run.collect_eval(wait=True)
    run.checkpoint()
    run.reporter.close()

    wall = run.wall
    session_wall = wall - run.wall_before
    stages = sup.stage_seconds()
    session_steps = run.env_steps - run.env_steps_before
    lags = run.lags
    start = run.session_start
    summary = run.reporter.write_summary({
        "env_steps": run.env_steps,
        "updates": sup.updates,
        "wall_seconds": round(wall, 2),
        "session_wall_seconds": round(session_wall, 2),
        "stop_reason": stop_reason,
        "interrupted": stop_reason == "interrupted",
        "mode": "fleet",
        "eval": {"return_mean": final["mean"], "return_std": final["std"], "episodes": len(final["returns"]),
                 "success_rate": final.get("success_rate"), "policy_version": final["version"],
                 "curve": run.reporter.evals},
        "throughput": {"env_steps_per_s": session_steps / session_wall,
                       "updates_per_s": (sup.updates - start.updates) / session_wall,
                       "inserts_per_s": (sup.inserts - start.inserts) / session_wall,
                       "samples_per_s": (sup.samples - start.samples) / session_wall,
                       "weight_publishes_per_s": final_status["publishes"] / session_wall,
                       "stage_seconds": {k: round(v, 2) for k, v in stages.items()}},
        "replay": {"size": sum(s["size"] for s in sup.shard_stats), "samples_per_insert": sup.replay_ratio(),
                   "samples_per_insert_target": cfg.replay.samples_per_insert, "restored_size": restored,
                   "error_buffer_per_shard": sup.shard_stats[0]["error_buffer"]},
        "policy_lag": {"mean": sum(lags) / len(lags) if lags else None, "last": lags[-1] if lags else None,
                       "unit": "learner updates between the policy that acted and the learner's current one"},
        "actors": {"num": cfg.actors.num, "envs_per_actor": cfg.actors.envs_per_actor, "restarts": sup.restarts},
        "resources": asdict(run.res),
        "learner_device": fleet.device,
        "config": to_dict(cfg),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "ray": ray.__version__,
    })
    plots = write_plots(run.run_dir, run.reporter.evals, stages, cfg.env.id)
    health = summary["health"]
    run.echo(f"done ({stop_reason}): {run.env_steps:,} env steps, {sup.updates:,} updates in {session_wall:.1f}s "
             f"({summary['throughput']['env_steps_per_s']:.0f} steps/s, {summary['throughput']['updates_per_s']:.0f} "
             f"updates/s, replay ratio {summary['replay']['samples_per_insert']:.1f} of "
             f"{cfg.replay.samples_per_insert:g}); eval return {final['mean']:.1f} +- {final['std']:.1f} over "
             f"{len(final['returns'])} episodes{success_note(final.get('success_rate'))}; health {health['status']}"
             f"{' (' + ', '.join(w['check'] for w in health['warnings']) + ')' if health['warnings'] else ''}; "
             f"summary {run.run_dir / 'summary.json'}{'; plots ' + ', '.join(p.name for p in plots) if plots else ''}")
    return summary
