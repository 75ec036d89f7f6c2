"""The e2e suite: the whole fleet (actors, replay shard, learner) training HalfCheetah for a fixed
wall time, for 1, 2, 4, ... actors up to the cores available: steady-state env steps/s and updates/s,
the updates/s as a fraction of the learner suite's rate on the same device, the replay ratio held,
the policy lag, and where the time went per stage."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Sequence

from sacfleet.bench import Record, ray_session
from sacfleet.bench.actors_suite import actor_counts

CONFIG = "halfcheetah"
LEARNING_STARTS = 2_000


def steady_rates(metrics_path: Path) -> tuple[float, float]:
    """Env steps/s and updates/s between the first progress record with updates and the last one,
    which leaves out Ray's start-up, the random warm-up and the final evaluation."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("train/n_updates", 0) > 0]
    if len(rows) < 2:
        raise RuntimeError(f"e2e: too few progress records with updates in {metrics_path} to measure a rate; "
                           "raise --seconds")
    first, last = rows[0], rows[-1]
    span = last["wall_seconds"] - first["wall_seconds"]
    return ((last["env_steps"] - first["env_steps"]) / span,
            (last["train/n_updates"] - first["train/n_updates"]) / span)


def run_fleet(config: str, num_actors: int, wall_seconds: float, run_dir: Path, echo: Callable[[str], None]) -> dict:
    from sacfleet.common.config import load_config
    from sacfleet.common.envs import describe_env
    from sacfleet.driver.train_fleet import train_fleet

    cfg = load_config(config, [f"actors.num={num_actors}", "replay.capacity=200000",
                               f"train.learning_starts={LEARNING_STARTS}", "train.total_env_steps=100000000",
                               f"train.max_wall_seconds={wall_seconds}", "train.log_interval=500",
                               "eval.interval=0", "eval.final_episodes=1",
                               # Critic-only updates are cheaper: the steady rate is that of full ones.
                               "learner.critic_warmup=0"])
    summary = train_fleet(cfg, run_dir, echo=lambda line: echo(f"  {line}"))
    env_rate, update_rate = steady_rates(run_dir / "metrics.jsonl")
    info = describe_env(cfg.env)
    return {"summary": summary, "env_steps_per_s": env_rate, "updates_per_s": update_rate,
            "shapes": (info.obs_dim, info.act_dim, tuple(cfg.learner.hidden_sizes))}


def learner_fraction(summary: dict, shapes: tuple, fleet_rate: float, seconds: float, suite_rates: dict,
                     common: dict, echo: Callable[[str], None]) -> list[Record]:
    """The fleet's steady updates/s as a fraction of the learner suite's rate, measured here on the
    fleet learner's device, batch size, torch threads and matmul precision, one update at a time and in
    blocks of learner.prefetch_batches (the fleet's way)."""
    import torch

    from sacfleet.bench import learner_suite

    learner = summary["config"]["learner"]
    key = (summary["learner_device"], learner["batch_size"], summary["resources"]["learner_threads"],
           learner["prefetch_batches"], learner["matmul_precision"], shapes)
    if key not in suite_rates:
        device, batch_size, threads, k, precision, _ = key
        suite_rates[key] = learner_suite.update_rates(torch.device(device), batch_size, seconds, threads, k,
                                                      precision, shapes)
    single, block = suite_rates[key]
    echo(f"  learner suite on {key[0]} ({key[2]} threads, {key[4]}): {single:,.0f} updates/s one at a time, "
         f"{block:,.0f} in blocks of {key[3]}; the fleet ran {fleet_rate / single:.2f} of the first, "
         f"{fleet_rate / block:.2f} of the second")
    return [Record(metric="learner suite updates_per_s", value=single, unit="updates/s", **common),
            Record(metric="learner suite updates_per_s: blocks", value=block, unit="updates/s", **common),
            Record(metric="updates_per_s: fraction of learner suite", value=fleet_rate / single, unit="ratio",
                   **common),
            Record(metric="updates_per_s: fraction of learner suite blocks", value=fleet_rate / block, unit="ratio",
                   **common)]


def run(seconds: float = 2.0, actors: Sequence[int] | None = None, config: str = CONFIG,
        wall_seconds: float | None = None, echo: Callable[[str], None] = print, **_) -> list[Record]:
    cores = os.cpu_count() or 1
    actors = actors or actor_counts(cores)
    wall = wall_seconds or max(20.0, 15 * seconds)  # start-up and warm-up take about 10 s of it
    records = []
    suite_rates: dict[tuple, tuple[float, float]] = {}  # the learner suite's, per fleet learner setting
    scratch = Path(tempfile.mkdtemp(prefix="sacfleet-e2e-"))
    try:
        with ray_session(cores):
            for n in actors:
                echo(f"e2e: {config} with {n} actor(s), {wall:g} s")
                out = run_fleet(config, n, wall, scratch / f"actors{n}", echo)
                summary = out["summary"]
                device = summary["learner_device"]
                name = f"{config} x {summary['actors']['envs_per_actor']} env(s)"
                ratio = summary["replay"]["samples_per_insert"] / summary["config"]["learner"]["batch_size"]
                target = summary["replay"]["samples_per_insert_target"] / summary["config"]["learner"]["batch_size"]
                lag = summary["policy_lag"]["mean"]
                echo(f"e2e {n} actor(s) {name}: {out['env_steps_per_s']:,.0f} env steps/s, {out['updates_per_s']:,.0f} updates/s, "
                     f"{ratio:.2f} updates per env step (target {target:g}), policy lag {lag or 0:.0f} updates")
                common = dict(suite="e2e", name=name, device=device, actors=n,
                              batch_size=summary["config"]["learner"]["batch_size"])
                records += [Record(metric="env_steps_per_s", value=out["env_steps_per_s"], unit="steps/s", **common),
                            Record(metric="updates_per_s", value=out["updates_per_s"], unit="updates/s", **common),
                            Record(metric="updates_per_env_step: held", value=ratio, unit="ratio", **common),
                            Record(metric="updates_per_env_step: target", value=target, unit="ratio", **common)]
                if lag is not None:
                    records.append(Record(metric="policy_lag", value=lag, unit="updates", **common))
                records += learner_fraction(summary, out["shapes"], out["updates_per_s"], seconds, suite_rates, common,
                                            echo)
                stages = summary["throughput"]["stage_seconds"]
                echo("  seconds per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()))
                records += [Record(metric=f"seconds: {stage}", value=value, unit="s", **common)
                            for stage, value in stages.items()]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return records
