"""PNG plots written at the end of a run: eval return against env steps and wall time, and
throughput per stage (rates over the run, and where the time went)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Mapping, Sequence

RATE_KEYS = {"time/fps": "env steps/s", "learner/updates_per_s": "updates/s",
             "replay/inserts_per_s": "inserts/s (transitions)", "replay/samples_per_s": "samples/s (transitions)"}


def read_metrics(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a killed run
            continue
    return records


def write_plots(run_dir: Path, evals: Sequence[Sequence[float]], stage_seconds: Mapping[str, float],
                title: str) -> list[Path]:
    """`evals`: (env_steps, wall_seconds, mean return[, success rate]) rows. Returns the files written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        warnings.warn(f"plots skipped: {exc}", stacklevel=2)
        return []
    run_dir = Path(run_dir)
    written = []

    successes = [row for row in evals if len(row) > 3]
    fig, axes = plt.subplots(1, 3 if successes else 2, figsize=(16 if successes else 11, 4))
    by_steps, by_time = axes[0], axes[1]
    if evals:
        steps, wall, returns = zip(*[row[:3] for row in evals])
        by_steps.plot(steps, returns, marker="o")
        by_time.plot(wall, returns, marker="o")
    by_steps.set_xlabel("env steps")
    by_time.set_xlabel("wall time (s)")
    for ax in (by_steps, by_time):
        ax.set_ylabel("eval mean return")
        ax.grid(alpha=0.3)
    if successes:
        axes[2].plot([row[0] for row in successes], [row[3] for row in successes], marker="o")
        axes[2].set_xlabel("env steps")
        axes[2].set_ylabel("eval success rate")
        axes[2].set_ylim(-0.05, 1.05)
        axes[2].grid(alpha=0.3)
    fig.suptitle(f"{title}: deterministic evaluation")
    fig.tight_layout()
    written.append(run_dir / "eval_return.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    records = read_metrics(run_dir / "metrics.jsonl")
    fig, (rates, stages) = plt.subplots(1, 2, figsize=(12, 4))
    for key, label in RATE_KEYS.items():
        points = [(r["wall_seconds"], r[key]) for r in records if key in r and r[key] > 0]
        if points:
            rates.plot(*zip(*points), label=label)
    rates.set_yscale("log")
    rates.set_xlabel("wall time (s)")
    rates.set_ylabel("rate")
    rates.grid(alpha=0.3, which="both")
    if rates.lines:
        rates.legend(fontsize=8)
    rates.set_title("rate of each stage")
    names = list(stage_seconds)
    stages.barh(names, [stage_seconds[n] for n in names])
    stages.set_xlabel("seconds (summed over the processes of a stage)")
    stages.set_title("where the time went")
    fig.suptitle(f"{title}: throughput per stage")
    fig.tight_layout()
    written.append(run_dir / "throughput.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)
    return written
