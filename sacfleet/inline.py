"""The in-process trainer (`sacfleet train --inline`): the fleet's components run in lockstep in one
process without Ray. Deterministic for a seed; for debugging, tests, and for measuring what
distribution buys.

Lockstep: each configured actor's rollout steps in turn, its transitions go to the next replay
shard, and the learner then updates from that shard for as long as its rate limiter allows, so
the replay ratio is exactly the configured samples_per_insert.
"""

from __future__ import annotations

import copy
import json
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
from sacfleet.common.envs import EnvInfo, describe_env
from sacfleet.common.io import atomic_write_bytes
from sacfleet.common.metrics import EpisodeStats, MetricsLogger
from sacfleet.common.transitions import TransitionSpec
from sacfleet.learner.checkpoint import write_run_checkpoint
from sacfleet.learner.sac import Batch, SACLearner, resolve_device
from sacfleet.replay_server.shard import make_table
from sacfleet.replay_server.table import ReplayTable


def build_tables(cfg: Config, spec: TransitionSpec, insert_size: int) -> list[ReplayTable]:
    return [make_table(cfg, spec, shard, insert_size, cfg.learner.batch_size) for shard in range(cfg.replay.num_shards)]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def env_info_dict(info: EnvInfo) -> dict:
    return {"obs_dim": info.obs_dim, "act_dim": info.act_dim, "action_low": info.action_low.tolist(),
            "action_high": info.action_high.tolist(), "max_episode_steps": info.max_episode_steps}


@dataclass
class Progress:
    """Counters and timers of a run; `time_*` say where the wall time went."""

    env_steps: int = 0
    start: float = field(default_factory=time.monotonic)
    time_env: float = 0.0
    time_update: float = 0.0
    time_eval: float = 0.0
    evals: list = field(default_factory=list)  # (env_steps, wall_seconds, mean return)

    @property
    def wall(self) -> float:
        return time.monotonic() - self.start


def echo_flush(line: str) -> None:
    """Progress lines reach a log file or pipe as they happen, not when a buffer fills."""
    print(line, flush=True)


class RunDirInUse(RuntimeError):
    """The run directory already holds another run's outputs, which a new run would overwrite."""


def check_run_dir(run_dir: Path) -> None:
    taken = [name for name in ("summary.json", "checkpoints", "metrics.jsonl") if (Path(run_dir) / name).exists()]
    if taken:
        raise RunDirInUse(f"run directory {run_dir} already holds a run ({', '.join(taken)}); "
                          f"choose another --run-dir, or continue that run with --resume")


def train_inline(cfg: Config, run_dir: Path, echo: Callable[[str], None] | None = None) -> dict:
    echo = echo or echo_flush
    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    seed_everything(cfg.train.seed)
    if cfg.learner.num_threads:
        torch.set_num_threads(cfg.learner.num_threads)

    env_info = describe_env(cfg.env)
    spec = TransitionSpec(env_info.obs_dim, env_info.act_dim)
    device = resolve_device(cfg.learner.device)
    learner = SACLearner.from_config(cfg.learner, env_info, device)
    tables = build_tables(cfg, spec, insert_size=cfg.actors.envs_per_actor)
    rollouts = [Rollout(cfg.env, env_info, cfg.actors.envs_per_actor, seed=cfg.train.seed, actor_index=i)
                for i in range(cfg.actors.num)]
    metrics = MetricsLogger(run_dir)
    episodes = EpisodeStats()
    progress = Progress()
    batch_size = cfg.learner.batch_size
    prioritized = cfg.replay.sampler == "prioritized"
    next_log, next_eval, next_ckpt = cfg.train.log_interval, cfg.eval.interval, cfg.checkpoint.interval
    last_log = (0, 0, progress.wall)  # env steps, updates, wall time at the last progress line
    published: tuple = ({}, -1)  # the newest published weights and their version

    echo(f"sacfleet inline: {cfg.env.id} obs_dim={env_info.obs_dim} act_dim={env_info.act_dim} "
         f"actors={cfg.actors.num}x{cfg.actors.envs_per_actor} shards={len(tables)} device={device} "
         f"steps={cfg.train.total_env_steps:,} run_dir={run_dir}")
    interrupted = False
    turn = 0
    try:
        while progress.env_steps < cfg.train.total_env_steps:
            if cfg.train.max_wall_seconds and progress.wall > cfg.train.max_wall_seconds:
                echo(f"stopping: train.max_wall_seconds={cfg.train.max_wall_seconds:g} reached")
                break
            rollout = rollouts[turn % len(rollouts)]
            table = tables[turn % len(tables)]
            turn += 1

            # Weights are "published" every publish_interval updates; a rollout picks up the newest
            # every weight_sync_interval of its steps, as a fleet actor would.
            version = learner.updates - learner.updates % cfg.learner.publish_interval
            if rollout.steps % cfg.actors.weight_sync_interval == 0 and version > rollout.policy_version:
                if published[1] != version:
                    published = (learner.policy_weights(), version)
                rollout.load_weights(*published)

            t0 = time.monotonic()
            transitions = rollout.step(random_actions=progress.env_steps < cfg.train.learning_starts)
            t1 = time.monotonic()
            table.insert(transitions)
            progress.env_steps += rollout.num_envs
            episodes.extend(rollout.pop_finished())
            while table.limiter.check_sample(batch_size).ok:
                sample = table.sample(1, batch_size)
                batch = Batch.from_numpy({k: v[0] for k, v in sample.data.items()},
                                         None if sample.weights is None else sample.weights[0], device)
                td_error = learner.update(batch)
                if prioritized:
                    table.update_priorities(sample.keys[0], td_error.cpu().numpy())
            progress.time_env += t1 - t0
            progress.time_update += time.monotonic() - t1

            # At the last step the final evaluation stands in for a periodic one.
            if cfg.eval.interval and next_eval <= progress.env_steps < cfg.train.total_env_steps:
                next_eval += cfg.eval.interval
                _evaluate(cfg, learner, progress, metrics, cfg.eval.episodes)
            if progress.env_steps >= next_log:
                next_log += cfg.train.log_interval
                last_log = _log_progress(cfg, learner, tables, episodes, progress, metrics, last_log, echo)
            if cfg.checkpoint.interval and learner.updates >= next_ckpt:
                next_ckpt += cfg.checkpoint.interval
                _checkpoint(cfg, run_dir, learner, tables, progress, env_info)
    except KeyboardInterrupt:
        interrupted = True
        echo("interrupted: writing the final checkpoint and summary")
    finally:
        for rollout in rollouts:
            rollout.close()

    final = _evaluate(cfg, learner, progress, metrics, cfg.eval.final_episodes)
    _checkpoint(cfg, run_dir, learner, tables, progress, env_info)
    metrics.close()
    summary = _summary(cfg, learner, tables, progress, final, interrupted)
    atomic_write_bytes(run_dir / "summary.json", json.dumps(summary, indent=2).encode())
    echo(f"done: {progress.env_steps:,} env steps, {learner.updates:,} updates in {progress.wall:.1f}s; "
         f"eval return {summary['eval']['return_mean']:.1f} +- {summary['eval']['return_std']:.1f} "
         f"over {len(final)} episodes; summary: {run_dir / 'summary.json'}")
    return summary


def _evaluate(cfg: Config, learner: SACLearner, progress: Progress, metrics: MetricsLogger,
              episodes: int) -> np.ndarray:
    t0 = time.monotonic()
    policy = learner.actor
    if learner.device.type != "cpu":
        policy = copy.deepcopy(policy).cpu()
    returns = evaluate(policy, cfg.env, episodes, cfg.eval.seed)
    progress.time_eval += time.monotonic() - t0
    progress.evals.append((progress.env_steps, round(progress.wall, 2), float(returns.mean())))
    metrics.log(progress.env_steps, progress.wall, {"eval/mean_reward": returns.mean(), "eval/std_reward": returns.std()})
    return returns


def _log_progress(cfg, learner, tables, episodes, progress, metrics, last, echo):
    steps0, updates0, wall0 = last
    wall = progress.wall
    span = max(wall - wall0, 1e-9)
    fps = (progress.env_steps - steps0) / span
    values = {**learner.metrics.read(), **episodes.summary(),
              "train/n_updates": learner.updates,
              "time/fps": fps,
              "learner/updates_per_s": (learner.updates - updates0) / span,
              "replay/size": sum(t.size for t in tables),
              "replay/samples_per_insert": _ratio(tables)}
    metrics.log(progress.env_steps, wall, values)
    parts = [f"steps {progress.env_steps:>9,}/{cfg.train.total_env_steps:,}", f"updates {learner.updates:>9,}"]
    if "rollout/ep_rew_mean" in values:
        parts.append(f"ep_rew_mean {values['rollout/ep_rew_mean']:9.1f}")
    if progress.evals:
        parts.append(f"eval {progress.evals[-1][2]:9.1f}")
    eta = (cfg.train.total_env_steps - progress.env_steps) / max(fps, 1e-9)
    parts += [f"{fps:6.0f} steps/s", f"{values['learner/updates_per_s']:6.0f} updates/s", f"eta {eta:5.0f}s"]
    echo(" | ".join(parts))
    return progress.env_steps, learner.updates, wall


def _ratio(tables: list[ReplayTable]) -> float:
    samples = sum(t.limiter.samples for t in tables)
    effective = sum(t.limiter.inserts - t.limiter.min_size_to_sample for t in tables)
    return samples / effective if effective > 0 else float("nan")


def _checkpoint(cfg, run_dir, learner, tables, progress, env_info) -> None:
    write_run_checkpoint(Path(run_dir) / "checkpoints", learner.state_dict(),
                         {"env_steps": progress.env_steps, "config": to_dict(cfg), "env_info": env_info_dict(env_info)},
                         [table.snapshot() for table in tables] if cfg.checkpoint.replay else None)


def _summary(cfg, learner, tables, progress, final, interrupted) -> dict:
    wall = progress.wall
    return {
        "env_steps": progress.env_steps,
        "updates": learner.updates,
        "wall_seconds": round(wall, 2),
        "interrupted": interrupted,
        "mode": "inline",
        "eval": {"return_mean": float(final.mean()), "return_std": float(final.std()), "episodes": int(final.size),
                 "curve": progress.evals},
        "throughput": {"env_steps_per_s": progress.env_steps / wall, "updates_per_s": learner.updates / wall,
                       "seconds_env": round(progress.time_env, 2), "seconds_replay_and_update": round(progress.time_update, 2),
                       "seconds_eval": round(progress.time_eval, 2)},
        "replay": {"size": sum(t.size for t in tables), "samples_per_insert": _ratio(tables),
                   "samples_per_insert_target": cfg.replay.samples_per_insert},
        "config": to_dict(cfg),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
