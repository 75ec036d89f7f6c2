"""The in-process trainer (`sacfleet train --inline`): the fleet's components run in lockstep in one
process without Ray. Deterministic for a seed; for debugging, tests, and for measuring what
distribution buys.

Lockstep: each configured actor's rollout steps in turn, its transitions go to the next replay
shard, and the learner then updates from that shard for as long as its rate limiter allows, so
the replay ratio is exactly the configured samples_per_insert.
"""

from __future__ import annotations

import copy
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from sacfleet.actors.evaluate import evaluate
from sacfleet.actors.rollout import Rollout
from sacfleet.common.config import Config, save_config, to_dict
from sacfleet.common.envs import EnvInfo, check_env_config, describe_env
from sacfleet.common.plots import write_plots
from sacfleet.common.transitions import TransitionSpec
from sacfleet.driver.checkpoint_files import kept_checkpoint_note, write_run_checkpoint
from sacfleet.driver.errors import RunFailed
from sacfleet.driver.report import Point, Reporter, her_values, success_note
from sacfleet.driver.run_dir import check_run_dir, echo_flush
from sacfleet.learner.batch import Batch
from sacfleet.learner.builder import make_learner
from sacfleet.learner.sac import LearnerDiverged, SACLearner, resolve_device, set_matmul_precision
from sacfleet.replay_server.shard import make_table
from sacfleet.replay_server.snapshot_files import SnapshotWriter
from sacfleet.replay_server.table import ReplayTable


def build_tables(cfg: Config, spec: TransitionSpec, insert_size: int) -> list[ReplayTable]:
    return [make_table(cfg, spec, shard, insert_size, cfg.learner.batch_size) for shard in range(cfg.replay.num_shards)]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Timers:
    """Where the wall time went."""

    start: float = field(default_factory=time.monotonic)
    env: float = 0.0
    update: float = 0.0
    eval: float = 0.0

    @property
    def wall(self) -> float:
        return time.monotonic() - self.start


def train_inline(cfg: Config, run_dir: Path, echo: Callable[[str], None] | None = None) -> dict:
    """Train in lockstep in this process; returns the summary (also written to run_dir/summary.json).
    Raises RunFailed (the last good checkpoint kept, summary.json saying why) if the learner diverges."""
    echo = echo or echo_flush
    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    env_info = describe_env(cfg.env)
    check_env_config(cfg, env_info)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    seed_everything(cfg.train.seed)
    if cfg.learner.num_threads:
        torch.set_num_threads(cfg.learner.num_threads)

    spec = TransitionSpec.for_env(env_info)
    device = resolve_device(cfg.learner.device)
    set_matmul_precision(cfg.learner.matmul_precision)
    learner = make_learner(cfg.learner, env_info, device)
    tables = build_tables(cfg, spec, insert_size=cfg.actors.envs_per_actor)
    rollouts = [Rollout(cfg.env, env_info, cfg.actors.envs_per_actor, seed=cfg.train.seed, actor_index=i)
                for i in range(cfg.actors.num)]
    timers = Timers()
    env_steps = 0
    point = lambda: Point(env_steps, learner.updates, timers.wall, env_steps,  # noqa: E731
                          sum(t.limiter.samples for t in tables))
    reporter = Reporter(cfg, run_dir, echo, act_dim=env_info.act_dim, fleet=False, start=point())
    batch_size = cfg.learner.batch_size
    prioritized = cfg.replay.sampler == "prioritized"
    next_log, next_eval, next_ckpt = cfg.train.log_interval, cfg.eval.interval, cfg.checkpoint.interval
    next_ckpt_wall = cfg.checkpoint.interval_s
    snapshots = SnapshotWriter(run_dir / "checkpoints", len(tables))
    published: tuple = ({}, -1)  # the newest published weights and their version

    echo(f"sacfleet inline: {cfg.env.id} obs_dim={env_info.obs_dim} act_dim={env_info.act_dim} "
         f"actors={cfg.actors.num}x{cfg.actors.envs_per_actor} shards={len(tables)} device={device} "
         f"steps={cfg.train.total_env_steps:,} run_dir={run_dir}")
    interrupted = False
    turn = 0
    try:
        while env_steps < cfg.train.total_env_steps:
            if cfg.train.max_wall_seconds and timers.wall > cfg.train.max_wall_seconds:
                echo(f"stopping: train.max_wall_seconds={cfg.train.max_wall_seconds:g} reached")
                break
            index = turn % len(rollouts)
            rollout = rollouts[index]
            # Relabeling needs each actor's episodes in one shard; otherwise turns spread evenly.
            table = tables[index % len(tables) if cfg.replay.her != "off" else turn % len(tables)]
            turn += 1

            # Weights are "published" every publish_interval updates; a rollout picks up the newest
            # every weight_sync_interval of its steps, as a fleet actor would.
            version = learner.updates - learner.updates % cfg.learner.publish_interval
            if rollout.steps % cfg.actors.weight_sync_interval == 0 and version > rollout.policy_version:
                if published[1] != version:
                    published = (learner.policy_weights(), version)
                rollout.load_weights(*published)

            t0 = time.monotonic()
            transitions = rollout.step(random_actions=env_steps < cfg.train.learning_starts)
            t1 = time.monotonic()
            table.insert(transitions)
            env_steps += rollout.num_envs
            reporter.episodes.extend(rollout.pop_finished())
            while table.limiter.check_sample(batch_size).ok:
                sample = table.sample(1, batch_size)
                batch = Batch.from_numpy({k: v[0] for k, v in sample.data.items()},
                                         None if sample.weights is None else sample.weights[0], device)
                td_error = learner.update(batch)
                if prioritized:
                    table.update_priorities(sample.keys[0], learner.priorities(td_error))
            timers.env += t1 - t0
            timers.update += time.monotonic() - t1

            # At the last step the final evaluation stands in for a periodic one.
            if cfg.eval.interval and next_eval <= env_steps < cfg.train.total_env_steps:
                next_eval += cfg.eval.interval
                _evaluate(cfg, learner, reporter, timers, env_steps, cfg.eval.episodes)
            if env_steps >= next_log:
                next_log += cfg.train.log_interval
                learner.check_finite()
                reporter.progress(point(), {**learner.metrics.read(), "replay/size": sum(t.size for t in tables),
                                            "replay/samples_per_insert": _ratio(tables),
                                            **her_values([t.stats() for t in tables])})
            if (cfg.checkpoint.interval and learner.updates >= next_ckpt) or (
                    cfg.checkpoint.interval_s and timers.wall >= next_ckpt_wall):
                next_ckpt = (learner.updates // cfg.checkpoint.interval + 1) * cfg.checkpoint.interval \
                    if cfg.checkpoint.interval else 0
                next_ckpt_wall = timers.wall + cfg.checkpoint.interval_s
                _checkpoint(cfg, run_dir, learner, tables, snapshots, env_steps, env_info)
        learner.check_finite()
    except KeyboardInterrupt:
        interrupted = True
        echo("interrupted: writing the final checkpoint and summary")
    except LearnerDiverged as exc:
        reporter.diverged(point(), exc.update, exc.what, str(exc), mode="inline")
        raise RunFailed(f"{exc}; {kept_checkpoint_note(run_dir / 'checkpoints')}") from None
    finally:
        for rollout in rollouts:
            rollout.close()

    # The learner's state is saved before the final evaluation, which could fail or be interrupted.
    _checkpoint(cfg, run_dir, learner, tables, snapshots, env_steps, env_info)
    returns, success_rate = _evaluate(cfg, learner, reporter, timers, env_steps, cfg.eval.final_episodes)
    reporter.close()
    summary = reporter.write_summary(_summary(cfg, learner, tables, timers, env_steps, returns, success_rate,
                                              reporter.evals, interrupted))
    write_plots(run_dir, reporter.evals, {"env": timers.env, "replay and update": timers.update,
                                          "eval": timers.eval}, cfg.env.id)
    echo(f"done: {env_steps:,} env steps, {learner.updates:,} updates in {timers.wall:.1f}s; "
         f"eval return {summary['eval']['return_mean']:.1f} +- {summary['eval']['return_std']:.1f} "
         f"over {len(returns)} episodes{success_note(success_rate)}; health {summary['health']['status']}; "
         f"summary: {run_dir / 'summary.json'}")
    return summary


def _evaluate(cfg: Config, learner: SACLearner, reporter: Reporter, timers: Timers, env_steps: int,
              episodes: int) -> tuple[np.ndarray, float | None]:
    t0 = time.monotonic()
    policy = learner.actor
    if learner.device.type != "cpu":
        policy = copy.deepcopy(policy).cpu()
    returns, success_rate = evaluate(policy, cfg.env, episodes, cfg.eval.seed)
    timers.eval += time.monotonic() - t0
    reporter.evaluation(env_steps, timers.wall, returns.tolist(), success_rate)
    return returns, success_rate


def _ratio(tables: list[ReplayTable]) -> float:
    samples = sum(t.limiter.samples for t in tables)
    effective = sum(t.limiter.inserts - t.limiter.min_size_to_sample for t in tables)
    return samples / effective if effective > 0 else float("nan")


def _checkpoint(cfg, run_dir, learner, tables, snapshots: SnapshotWriter, env_steps: int, env_info: EnvInfo) -> None:
    # state_dict() refuses a diverged learner's state, so the last good checkpoint stays in place.
    state = learner.state_dict()
    if cfg.checkpoint.replay:
        snapshots.next_generation()
        for shard, table in enumerate(tables):
            start = table.begin_snapshot()
            try:
                snapshots.write_shard(shard, start, table.snapshot_segment)
            except BaseException:
                table.mark_dirty(start["dirty"])
                raise
    write_run_checkpoint(Path(run_dir) / "checkpoints", state,
                         {"env_steps": env_steps, "config": to_dict(cfg), "env_info": env_info.to_dict()},
                         snapshots.manifest() if cfg.checkpoint.replay else None)


def _summary(cfg, learner, tables, timers, env_steps, final, success_rate, evals, interrupted) -> dict:
    wall = timers.wall
    return {
        "env_steps": env_steps,
        "updates": learner.updates,
        "wall_seconds": round(wall, 2),
        "interrupted": interrupted,
        "mode": "inline",
        "eval": {"return_mean": float(final.mean()), "return_std": float(final.std()), "episodes": int(final.size),
                 "success_rate": success_rate,
                 "curve": evals},
        "throughput": {"env_steps_per_s": env_steps / wall, "updates_per_s": learner.updates / wall,
                       "seconds_env": round(timers.env, 2), "seconds_replay_and_update": round(timers.update, 2),
                       "seconds_eval": round(timers.eval, 2)},
        "replay": {"size": sum(t.size for t in tables), "samples_per_insert": _ratio(tables),
                   "samples_per_insert_target": cfg.replay.samples_per_insert},
        "config": to_dict(cfg),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
