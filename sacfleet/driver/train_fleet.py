"""Runs a fleet training session to its end: progress, evaluations and checkpoints on schedule; a
stop on steps, wall time or Ctrl-C with a checkpoint, then a final evaluation and the summary; a
failure stops with the learner's state saved. `fleet.py` builds the fleet, `supervisor.py` watches
it (with `env_actors.py` and `evaluations.py`), `recovery.py` brings back a dead shard, learner or
eval actor, `checkpointing.py` saves and restores checkpoint sets, `scaling.py` changes the actor
count, `report.py` says what it sees, `resume.py` checks what a resumed run continues from
(docs/architecture.md).

The driver only steers: transitions go from actors to shards and batches from shards to the
learner without passing through it. Checkpoints and replay snapshots do come to the driver, which
writes them into the run directory, so a run on a multi-node cluster needs no shared filesystem.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import ray

from sacfleet.common.config import Config, save_config, to_dict
from sacfleet.common.envs import EnvInfo, check_env_config, describe_env
from sacfleet.driver.checkpoint_files import DAMAGED_SUFFIX, BestPolicy, WriteFailures, kept_checkpoint_note
from sacfleet.driver.checkpointing import CheckpointSkipped, FleetCheckpointer
from sacfleet.common.transitions import TransitionSpec
from sacfleet.driver.errors import FleetDiverged, FleetError, RunRefused, RunStopped
from sacfleet.driver.fleet import Fleet, FleetParts, connect
from sacfleet.driver.placement import Reservation, Resources, cluster_nodes, describe, plan_fleet, reserved_nodes
from sacfleet.driver.recovery import FleetRecovery
from sacfleet.driver.report import INTERRUPTED, Point, Reporter, her_values, ratio_inserts, replay_section
from sacfleet.driver.resume import ResumePoint, load_resume
from sacfleet.driver.run_dir import check_run_dir, echo_flush
from sacfleet.driver.scaling import Scaler
from sacfleet.driver.schedule import RunSchedule
from sacfleet.driver.supervisor import FleetSupervisor
from sacfleet.replay_server.storage import ReplayMemoryError, check_fits

__all__ = ["FleetError", "Resources", "connect", "plan_fleet", "train_fleet"]

POLL_SECONDS = 0.5
SAVE_ON_FAILURE_TIMEOUT = 30.0  # a failing run's last checkpoint waits this long for each component


# ------------------------------------------------------------------------------------ a run

class FleetRun:
    """One session of a run: the fleet, its supervisor, recovery, checkpointer and reporter, and the
    totals that continue across resumed sessions."""

    def __init__(self, cfg: Config, run_dir: Path, fleet: Fleet, env_info: EnvInfo, res: Resources,
                 resume: ResumePoint | None, checkpointer: FleetCheckpointer, echo: Callable[[str], None],
                 start: float):
        self.cfg, self.run_dir, self.fleet, self.res, self.echo = cfg, run_dir, fleet, res, echo
        self.start = start  # the session's clock includes starting Ray and the fleet
        self.env_info = env_info
        self.checkpointer = checkpointer
        self.env_steps_before = resume.env_steps if resume else 0
        self.wall_before = resume.wall_seconds if resume else 0.0
        self.lags: list = list(resume.lags) if resume else []
        self.session_start = Point(self.env_steps_before, fleet.updates_at_start, self.wall_before,
                                   fleet.inserts_at_start, fleet.samples_at_start)
        self.reporter = Reporter(cfg, run_dir, echo, act_dim=env_info.act_dim, fleet=True,
                                 start=self.session_start, evals=resume.evals if resume else None)
        self.recovery = FleetRecovery(cfg, fleet, checkpointer, echo, resume.recoveries if resume else None)
        fleet.actors.restarts_before = resume.restarts if resume else 0
        self.supervisor = FleetSupervisor(fleet, echo, self.reporter.episodes, self.recovery, lambda: self.env_steps)
        self.scaler = Scaler(run_dir, fleet, echo, lambda: self.env_steps, lambda: self.wall)
        self.eval_at: tuple[int, float] | None = None
        self.best = BestPolicy(cfg, Path(run_dir) / "checkpoints", env_info.to_dict())
        self.placement: list[dict] = []  # each node and the parts running there, as the fleet started
        self.reservation: dict | None = None  # the placement group each part runs in, for a reserved fleet
        self.reported_lost_updates = 0
        self.write_failures = WriteFailures(cfg.checkpoint.max_write_failures, Path(run_dir) / "checkpoints", echo)
        self.failed: str | None = None  # why the run stopped early, in order

    @property
    def wall(self) -> float:
        return self.wall_before + time.monotonic() - self.start

    @property
    def env_steps(self) -> int:
        """Transitions collected: those in the shards' counters, plus those a recovered shard lost."""
        sup = self.supervisor
        return self.steps_for(sup.inserts)

    def steps_for(self, inserts: int) -> int:
        return self.env_steps_before + inserts - self.fleet.inserts_at_start + self.supervisor.lost_inserts

    def point(self) -> Point:
        sup = self.supervisor
        return Point(self.env_steps, sup.updates, self.wall, sup.inserts, sup.samples)

    def log_progress(self) -> None:
        sup = self.supervisor
        sup.poll(read_metrics=True)
        lag = sup.policy_lag()
        if math.isfinite(lag):
            self.lags.append(lag)
        if sup.lost_updates != self.reported_lost_updates:  # a recovered learner counts from its checkpoint
            last = self.reporter.last
            self.reporter.last = dataclasses.replace(
                last, updates=last.updates - (sup.lost_updates - self.reported_lost_updates))
            self.reported_lost_updates = sup.lost_updates
        now = self.point()
        recovery = self.recovery.totals()
        recent = self.recent_ratio(self.reporter.last, now)
        values = {**sup.learner_status.get("metrics", {}),
                  "replay/size": sup.replay_size,
                  "replay/samples_per_insert": sup.replay_ratio(),
                  "replay/ratio_inserts": ratio_inserts(sup.shard_stats), "learner/policy_lag": lag,
                  "actors/restarts": self.fleet.actors.restarts, "actors/hung": self.fleet.actors.hung,
                  "fleet/actors": len(self.fleet.actors), "fleet/recoveries": recovery["recoveries"],
                  "fleet/hung": recovery["hung"],
                  "fleet/lost_transitions": recovery["lost_transitions"],
                  "fleet/lost_updates": recovery["lost_updates"], **sup.stall_values(), **her_values(sup.shard_stats),
                  **({"replay/samples_per_insert_recent": recent} if recent is not None else {})}
        starved = sup.learner_status.get("starved_reason")
        note = f"\n  waiting: {starved}" if starved and now.updates == self.reporter.last.updates else ""
        self.reporter.progress(now, values, note)

    def recent_ratio(self, last: Point, now: Point) -> float | None:
        """Samples per insert since the last record, once learning has started and when the window is
        long enough to say something: each shard's limiter lets samples run up to its error buffer ahead
        of or behind inserts, so between two records they may swing by twice that, and a window must hold
        twenty times the buffers for its ratio to be a tenth or less off the target from that alone
        (the last record of a run, after the actors stopped, is usually too short)."""
        inserts, samples = now.inserts - last.inserts, now.samples - last.samples
        slack = sum(s["error_buffer"] for s in self.supervisor.shard_stats)
        if last.samples <= 0 or inserts <= 0 or inserts * self.cfg.replay.samples_per_insert < 20 * slack:
            return None
        return samples / inserts

    def start_eval(self, episodes: int) -> None:
        if self.supervisor.evaluations.start(episodes, self.best.threshold):
            self.eval_at = (self.env_steps, self.wall)

    def collect_eval(self, wait: bool = False) -> dict | None:
        result = self.supervisor.evaluations.result(wait)
        if result is None:
            return None
        mean, std = self.reporter.evaluation(*self.eval_at, result["returns"], result.get("success_rate"))
        if "weights" in result:
            try:
                self.best.offer(result.pop("weights"), result["version"], mean, self.eval_at[0])
            except OSError as exc:  # a full disk: the run goes on without it
                self.echo(f"best policy not kept: {exc}")
        return {**result, "mean": mean, "std": std}

    def checkpoint(self, on_failure: bool = False) -> None:
        """Commit a checkpoint set: the learner's state, the shards' snapshots (streamed), and the
        counters as the snapshots hold them. `on_failure`: short timeouts, and dead shards keep
        their last snapshots."""
        fleet = self.fleet
        state, inserts = (self.checkpointer.take(fleet.learner, fleet.shards, SAVE_ON_FAILURE_TIMEOUT, True)
                          if on_failure else self.checkpointer.take(fleet.learner, fleet.shards,
                                                                    self.cfg.train.hang_timeout_s))
        self.checkpointer.commit(state, {
            "env_steps": self.steps_for(sum(inserts)), "config": to_dict(self.cfg),
            "env_info": self.env_info.to_dict(), "fleet": self.fleet_totals()})

    def fleet_totals(self) -> dict:
        return {"wall_seconds": self.wall, "evals": self.reporter.evals, "restarts": self.fleet.actors.restarts,
                "session": self.fleet.session, "lags": self.lags[-1000:],
                "recoveries": self.recovery.totals()["events"]}

    def save_on_failure(self) -> str:
        """The learner's state (and the replay) saved as a run stops on a failure, when the learner
        is alive; says what a resume starts from."""
        try:
            self.supervisor.stop_actors(timeout=10)
            self.checkpoint(on_failure=True)
        except FleetDiverged:
            raise
        except Exception as exc:  # the component is gone: keep what the last set holds
            kept = kept_checkpoint_note(self.run_dir / "checkpoints")
            return f"could not save the learner's state now ({exc}); {kept}"
        return (f"the learner's state ({self.supervisor.updates:,} updates) and the replay were saved in "
                f"{self.run_dir / 'checkpoints'}; continue with --resume")


# ------------------------------------------------------------------------------------ train

def train_fleet(cfg: Config, run_dir: Path, *, address: str | None = None, resume: bool = False,
                num_cpus: int | None = None, dashboard: bool = False, reachable: bool = False,
                echo: Callable[[str], None] | None = None, parts: FleetParts = FleetParts(),
                reservation: Reservation | None = None) -> dict:
    """Train with the Ray fleet; returns the summary (also written to run_dir/summary.json). Raises
    FleetError naming the failed component, after saving the learner's state when it is alive
    (FleetDiverged when the learner diverged: then summary.json says so and the last good checkpoint
    is kept). `reachable`: an embedded Ray listens on the network, not only on loopback. `parts`: the
    classes the fleet's Ray actors run (fleet.FleetParts). `reservation`: a placement-group bundle the whole
    fleet is planned within and runs in (a sweep's fleet trial)."""
    start = time.monotonic()
    echo = echo or echo_flush
    run_dir = Path(run_dir)
    env_info = describe_env(cfg.env)
    check_env_config(cfg, env_info)
    # Everything a resume needs is checked before the run directory changes.
    point = load_resume(run_dir, cfg, env_info) if resume else None
    if address is None:  # every shard will be on this machine: refuse a replay that cannot fit before Ray starts
        try:
            check_fits(TransitionSpec.for_env(env_info), cfg.replay.capacity, cfg.replay.sampler == "prioritized",
                       cfg.replay.max_memory_fraction)
        except ReplayMemoryError as exc:
            raise RunRefused(str(exc)) from None
    if not resume:
        check_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")

    started_ray = connect(address, num_cpus, dashboard, reachable)
    fleet = run = None
    try:
        nodes = reserved_nodes(reservation) if reservation else cluster_nodes()
        res, placement = plan_fleet(cfg, nodes, reservation)
        echo(f"sacfleet: {cfg.env.id} obs_dim={env_info.obs_dim} act_dim={env_info.act_dim} | "
             f"{cfg.actors.num} actors x {cfg.actors.envs_per_actor} envs ({res.actor_cpus:g} CPU each), "
             f"{cfg.replay.num_shards} shards, learner {res.learner_cpus:g} CPU"
             f"{' + 1 GPU' if res.learner_gpus else ''}, {'reserved' if reservation else 'cluster'} "
             f"{res.cluster_cpus:g} CPUs{' (joined ' + address + ')' if address else ''}"
             f"{' in placement group ' + str(reservation) if reservation else ''} | steps {cfg.train.total_env_steps:,} | "
             f"run_dir {run_dir}")
        if point:
            echo(f"resuming at {point.env_steps:,} env steps, {point.learner_state['updates']:,} updates"
                 f"{', replay restored from snapshots' if point.replay else ', replay empty (no snapshots)'}")
            if point.skipped:
                echo(f"resume: {point.skipped}; the skipped files are set aside as NAME{DAMAGED_SUFFIX}")
            if point.applied:
                echo(f"resume applies: {'; '.join(point.applied)}")
        learner_state = point.learner_state if point else None
        checkpointer = FleetCheckpointer(cfg, run_dir / "checkpoints", point.replay if point else None, learner_state,
                                         point.kept_replay if point else (), point.damaged if point else ())
        fleet = Fleet(cfg, env_info, res, placement, checkpointer, learner_state, point.session if point else 0, echo,
                      parts)
        run = FleetRun(cfg, run_dir, fleet, env_info, res, point, checkpointer, echo, start)
        run.placement = fleet.where()
        echo(f"placement: {describe(run.placement)}")
        if reservation:
            run.reservation = {"placement_group": reservation.group, "bundle": reservation.bundle,
                               "parts": fleet.placement_groups()}
            outside = [part for part, group in run.reservation["parts"].items() if group != reservation.group]
            echo(f"reservation: {'every part runs' if not outside else 'NOT every part runs'} in placement group "
                 f"{reservation}" + (f" ({', '.join(outside)} outside it)" if outside else ""))
        try:
            summary = _supervise(run)
        except FleetDiverged as exc:
            # Stop at once: nothing diverged was published or saved; say so where the run's outputs are.
            run.reporter.diverged(run.point(), exc.update, exc.what, str(exc), mode="fleet")
            note = kept_checkpoint_note(run_dir / "checkpoints")
            raise FleetDiverged(exc.update, exc.what, f"{exc}; {note}") from None
        except FleetError as exc:
            raise FleetError(f"{exc}; {run.save_on_failure()}") from None
        if summary.get("failed"):  # stopped in order (final evaluation, summary), but not at its end
            raise RunStopped(f"{summary['stop_reason']}; {kept_checkpoint_note(run_dir / 'checkpoints')}")
        return summary
    finally:
        if run is not None:
            run.scaler.close()
        if fleet is not None:
            fleet.kill()
        if started_ray:
            ray.shutdown()


def _supervise(run: FleetRun) -> dict:
    cfg, sup = run.cfg, run.supervisor
    sup.poll(wait=True)
    restored = sum(s["restored_size"] for s in sup.shard_stats)
    schedule = RunSchedule(cfg, run.env_steps, sup.updates, run.wall)
    stop_reason = "train.total_env_steps reached"
    try:
        while True:
            time.sleep(POLL_SECONDS)
            sup.poll()
            run.scaler.check()
            run.reporter.watch(run.point(), sup.stall_values())
            run.collect_eval()
            if schedule.evaluation(run.env_steps):
                run.start_eval(cfg.eval.episodes)
            if schedule.log(run.env_steps):
                run.log_progress()
            if schedule.checkpoint(sup.updates, run.wall):
                try:
                    cause = run.write_failures.attempt(run.checkpoint)
                except CheckpointSkipped as exc:  # a dead component: the next poll recovers it
                    run.echo(str(exc))
                    if exc.silent and not sup.silent(exc.silent, "a checkpoint call"):
                        run.echo("  it answers status calls, so it is busy (a first compile?), not hung; "
                                 "the next checkpoint tries again")
                else:
                    if cause:
                        stop_reason = run.failed = cause
                        break
            if run.env_steps >= cfg.train.total_env_steps:
                break
            if cfg.train.max_wall_seconds and run.wall - run.wall_before > cfg.train.max_wall_seconds:
                stop_reason = f"train.max_wall_seconds={cfg.train.max_wall_seconds:g} reached"
                break
    except KeyboardInterrupt:
        stop_reason = INTERRUPTED
    run.scaler.close()  # a stopping run takes no more scale requests
    run.echo(f"stopping ({stop_reason}): checkpoint, final evaluation and summary")
    return _finish(run, stop_reason, restored)


def _finish(run: FleetRun, stop_reason: str, restored: int) -> dict:
    cfg, fleet, sup = run.cfg, run.fleet, run.supervisor
    sup.stop_actors()
    final_status = sup.stop_learner()
    run.log_progress()
    # The learner's state first: the evaluations after it may fail, hang or be interrupted.
    run.write_failures.attempt(run.checkpoint, "final checkpoint")
    saved = run.write_failures.count == 0
    run.collect_eval(wait=True)  # a periodic evaluation still running
    run.start_eval(cfg.eval.final_episodes)
    final = run.collect_eval(wait=True)
    if saved:  # the checkpoint's curve gets the final evaluation
        run.write_failures.attempt(lambda: run.checkpointer.amend(fleet=run.fleet_totals()), "final checkpoint")

    session_wall = run.wall - run.wall_before
    start, lags = run.session_start, run.lags
    stages = sup.stage_seconds()
    sections = {
        "session_wall_seconds": round(session_wall, 2),
        "throughput": {"env_steps_per_s": (run.env_steps - run.env_steps_before) / session_wall,
                       "updates_per_s": (sup.updates + sup.lost_updates - start.updates) / session_wall,
                       "inserts_per_s": (sup.inserts - start.inserts) / session_wall,
                       "samples_per_s": (sup.samples - start.samples) / session_wall,
                       "weight_publishes_per_s": final_status["publishes"] / session_wall,
                       "weight_encodes_per_s": final_status["weight_encodes"] / session_wall,
                       "weight_pulls_per_s": final_status["weight_pulls"] / session_wall,
                       "weight_bytes_per_pull": final_status["weight_bytes"],
                       "stage_seconds": {k: round(v, 2) for k, v in stages.items()}},
        "replay": {**replay_section(sup.shard_stats, cfg.replay.samples_per_insert), "restored_size": restored,
                   "error_buffer_per_shard": sup.shard_stats[0]["error_buffer"]},
        "policy_lag": {"mean": sum(lags) / len(lags) if lags else None, "last": lags[-1] if lags else None,
                       "unit": "learner updates between the policy that acted and the learner's current one"},
        "actors": {"num": len(fleet.actors), "initial": cfg.actors.num, "envs_per_actor": cfg.actors.envs_per_actor,
                   "restarts": fleet.actors.restarts, "hung": fleet.actors.hung, "scaling": run.scaler.changes},
        "recovery": run.recovery.totals(),
        "resources": asdict(run.res),
        "placement": run.placement,
        **({"reservation": run.reservation} if run.reservation else {}),
        "learner_device": fleet.device,
        "learner_matmul_precision": final_status["matmul_precision"],
        "ray": ray.__version__,
    }
    return run.reporter.finish(mode="fleet", stop_reason=stop_reason, now=run.point(), final=final,
                               sections=sections, stage_seconds=stages, best=run.best,
                               failed=run.failed is not None)
