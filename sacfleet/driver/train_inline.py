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
from sacfleet.common.transitions import TransitionSpec
from sacfleet.driver.checkpoint_files import BestPolicy, CheckpointSets, WriteFailures, kept_checkpoint_note
from sacfleet.driver.errors import RunFailed, RunRefused, RunStopped
from sacfleet.driver.report import INTERRUPTED, Point, Reporter, her_values, ratio_inserts, replay_ratio, replay_section
from sacfleet.driver.run_dir import check_run_dir, echo_flush
from sacfleet.driver.schedule import RunSchedule
from sacfleet.learner.batch import Batch
from sacfleet.learner.builder import make_learner
from sacfleet.learner.sac import LearnerDiverged, SACLearner, resolve_device, set_matmul_precision
from sacfleet.replay_server.shard import make_table
from sacfleet.replay_server.snapshot_files import SnapshotWriter
from sacfleet.replay_server.storage import ReplayMemoryError
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
    try:
        tables = build_tables(cfg, spec, insert_size=cfg.actors.envs_per_actor)
    except ReplayMemoryError as exc:
        raise RunRefused(str(exc)) from None
    rollouts = [Rollout(cfg.env, env_info, cfg.actors.envs_per_actor, seed=cfg.train.seed, actor_index=i)
                for i in range(cfg.actors.num)]
    timers = Timers()
    env_steps = 0
    point = lambda: Point(env_steps, learner.updates, timers.wall, env_steps,  # noqa: E731
                          sum(t.limiter.samples for t in tables))
    reporter = Reporter(cfg, run_dir, echo, act_dim=env_info.act_dim, fleet=False, start=point())
    batch_size = cfg.learner.batch_size
    prioritized = cfg.replay.sampler == "prioritized"
    schedule = RunSchedule(cfg)
    snapshots = SnapshotWriter(run_dir / "checkpoints", len(tables))
    sets = CheckpointSets(run_dir / "checkpoints", cfg.checkpoint.keep)
    write_failures = WriteFailures(cfg.checkpoint.max_write_failures, run_dir / "checkpoints", echo)
    save = lambda: _checkpoint(cfg, sets, learner, tables, snapshots, env_steps, env_info)  # noqa: E731
    failed = None  # why the run stopped early, in order
    best = BestPolicy(cfg, run_dir / "checkpoints", env_info.to_dict())
    published: tuple = ({}, -1)  # the newest published weights and their version

    echo(f"sacfleet inline: {cfg.env.id} obs_dim={env_info.obs_dim} act_dim={env_info.act_dim} "
         f"actors={cfg.actors.num}x{cfg.actors.envs_per_actor} shards={len(tables)} device={device} "
         f"steps={cfg.train.total_env_steps:,} run_dir={run_dir}")
    stop_reason = "train.total_env_steps reached"
    turn = 0
    try:
        while env_steps < cfg.train.total_env_steps:
            if cfg.train.max_wall_seconds and timers.wall > cfg.train.max_wall_seconds:
                stop_reason = f"train.max_wall_seconds={cfg.train.max_wall_seconds:g} reached"
                break
            index = turn % len(rollouts)
            rollout = rollouts[index]
            # Relabeling needs each actor's episodes in one shard; otherwise turns spread evenly.
            table = tables[index % len(tables) if cfg.replay.her != "off" else turn % len(tables)]
            turn += 1

            # Weights are "published" every publish_interval updates; a rollout picks up the newest
            # every weight_sync_interval of its steps, as a fleet actor would.
            version = learner.updates - learner.updates % cfg.learner.publish_interval
            if (rollout.steps % cfg.actors.weight_sync_interval == 0 and version > rollout.policy_version
                    and learner.policy_ready):
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

            if schedule.evaluation(env_steps):
                _evaluate(cfg, learner, reporter, timers, env_steps, cfg.eval.episodes, best)
            if schedule.log(env_steps):
                learner.check_finite()
                stats = [t.stats() for t in tables]
                reporter.progress(point(), {**learner.metrics.read(), "replay/size": sum(s["size"] for s in stats),
                                            "replay/samples_per_insert": replay_ratio(stats),
                                            "replay/ratio_inserts": ratio_inserts(stats), **her_values(stats)})
            if schedule.checkpoint(learner.updates, timers.wall) and (failed := write_failures.attempt(save)):
                stop_reason = failed
                break
        learner.check_finite()
    except KeyboardInterrupt:
        stop_reason = INTERRUPTED
    except LearnerDiverged as exc:
        reporter.diverged(point(), exc.update, exc.what, str(exc), mode="inline")
        raise RunFailed(f"{exc}; {kept_checkpoint_note(run_dir / 'checkpoints')}") from None
    finally:
        for rollout in rollouts:
            rollout.close()
    echo(f"stopping ({stop_reason}): checkpoint, final evaluation and summary")

    # The learner's state is saved before the final evaluation, which could fail or be interrupted.
    write_failures.attempt(save, "final checkpoint")
    final = _evaluate(cfg, learner, reporter, timers, env_steps, cfg.eval.final_episodes, best)
    wall = timers.wall
    sections = {
        "throughput": {"env_steps_per_s": env_steps / wall, "updates_per_s": learner.updates / wall,
                       "seconds_env": round(timers.env, 2), "seconds_replay_and_update": round(timers.update, 2),
                       "seconds_eval": round(timers.eval, 2)},
        "replay": replay_section([t.stats() for t in tables], cfg.replay.samples_per_insert),
    }
    stages = {"env": timers.env, "replay and update": timers.update, "eval": timers.eval}
    summary = reporter.finish(mode="inline", stop_reason=stop_reason, now=point(), final=final, sections=sections,
                              best=best, failed=failed is not None, stage_seconds=stages)
    if failed:
        raise RunStopped(f"{failed}; {kept_checkpoint_note(run_dir / 'checkpoints')}")
    return summary


def _evaluate(cfg: Config, learner: SACLearner, reporter: Reporter, timers: Timers, env_steps: int,
              episodes: int, best: BestPolicy) -> dict:
    """`episodes` deterministic episodes of the learner's policy, recorded, and the policy kept if it
    is the best yet; {"returns", "mean", "std", "success_rate"}."""
    t0 = time.monotonic()
    policy = learner.actor
    if learner.device.type != "cpu":
        policy = copy.deepcopy(policy).cpu()
    returns, success_rate = evaluate(policy, cfg.env, episodes, cfg.eval.seed)
    timers.eval += time.monotonic() - t0
    mean, std = reporter.evaluation(env_steps, timers.wall, returns.tolist(), success_rate)
    try:
        best.offer(policy.state_dict(), learner.updates, mean, env_steps)
    except OSError as exc:  # a full disk: the run goes on without it
        reporter.echo(f"best policy not kept: {exc}")
    return {"returns": returns.tolist(), "mean": mean, "std": std, "success_rate": success_rate}


def _checkpoint(cfg, sets: CheckpointSets, learner, tables, snapshots: SnapshotWriter, env_steps: int,
                env_info: EnvInfo) -> None:
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
    sets.commit(state, {"env_steps": env_steps, "config": to_dict(cfg), "env_info": env_info.to_dict()},
                snapshots.manifest() if cfg.checkpoint.replay else None)
