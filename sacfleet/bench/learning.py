"""`sacfleet bench learning`: what a learner option is worth in returns. Trains each preset with each
variant (`sac`: the preset itself; else `<preset>+<variant>`) to a step budget on each seed, one
`sacfleet train` at a time, and writes a table (final eval, wall time, updates/s, each variant's mean
against the first's) and the eval curves.

A trial whose directory holds a finished run with the same config is read instead of rerun, and an
unfinished fleet run is resumed from its last checkpoint, so an interrupted benchmark continues where it
stopped (on a machine that lends 10-minute commands, the same command again) and more seeds can be
added later; a run with another config is refused rather than mixed in. Killing the benchmark stops
the run it started.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from sacfleet.bench import Record
from sacfleet.common.config import ConfigError, load_config, to_dict
from sacfleet.common.reaper import start_reaper

BASELINE = "sac"  # the variant that is the preset as it is
CURVE_POINTS = 5  # evaluations per run: every steps / CURVE_POINTS env steps


@dataclass(frozen=True)
class Trial:
    preset: str
    variant: str
    seed: int

    @property
    def config(self) -> str:
        return self.preset if self.variant == BASELINE else f"{self.preset}+{self.variant}"

    @property
    def label(self) -> str:
        return f"{self.preset}-{self.variant}"

    def run_dir(self, out: Path) -> Path:
        return out / self.label / f"s{self.seed}"


def trial_overrides(trial: Trial, steps: int, extra: Sequence[str]) -> list[str]:
    return [f"train.seed={trial.seed}", f"train.total_env_steps={steps}",
            f"eval.interval={max(1, steps // CURVE_POINTS)}", *extra]


def plan(presets: Sequence[str], variants: Sequence[str], seeds: Sequence[int], steps: int,
         extra: Sequence[str]) -> list[Trial]:
    """The trials, seed-major (every preset and variant of seed 0 first, so that a benchmark stopped
    early has comparable pairs); each config is loaded once here, so a bad name or key fails at once."""
    trials = [Trial(p, v, s) for s in seeds for p in presets for v in variants]
    for trial in trials:
        load_config(trial.config, trial_overrides(trial, steps, extra))
    return trials


def _config_differences(run_dir: Path, expected: dict) -> list[str]:
    saved = to_dict(load_config(str(run_dir / "config.yaml")))
    return [f"{section}.{key}" for section, body in expected.items() for key, value in body.items()
            if saved.get(section, {}).get(key) != value]


def run_trial(trial: Trial, out: Path, steps: int, extra: Sequence[str], inline: bool,
              echo: Callable[[str], None]) -> dict | None:
    """The trial's summary: read from a finished run of the same config, or from a run made now (None
    if it failed; its log says why)."""
    overrides = trial_overrides(trial, steps, extra)
    expected = to_dict(load_config(trial.config, overrides))
    run_dir = trial.run_dir(out)
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        differ = _config_differences(run_dir, expected)
        if differ:
            raise ConfigError(f"{run_dir} holds a finished run with other settings ({', '.join(differ[:6])}); "
                              f"give another --out or remove it")
        echo(f"{trial.label} seed {trial.seed}: finished before, read from {run_dir}")
        return json.loads(summary_path.read_text())
    command = [sys.executable, "-m", "sacfleet", "train", "--config", trial.config, "--run-dir", str(run_dir)]
    command += [arg for override in overrides for arg in ("--set", override)]
    if inline:
        command.append("--inline")
    action = "training"
    if run_dir.exists():
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"{run_dir} exists and is not a sacfleet run directory; give another --out")
        differ = _config_differences(run_dir, expected)
        if differ:
            raise ConfigError(f"{run_dir} holds an unfinished run with other settings ({', '.join(differ[:6])}); "
                              f"give another --out or remove it")
        if not inline and (run_dir / "checkpoints" / "checkpoint.pt").is_file():
            command = [sys.executable, "-m", "sacfleet", "train", "--resume", str(run_dir),
                       "--set", f"train.total_env_steps={steps}"]
            action = "resuming the unfinished run"
        else:
            echo(f"{trial.label} seed {trial.seed}: {run_dir} holds an unfinished run without a checkpoint; "
                 f"starting it again")
            shutil.rmtree(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = run_dir.with_suffix(".log")
    echo(f"{trial.label} seed {trial.seed}: {action} to {steps:,} env steps ({log})")
    start = time.monotonic()
    with open(log, "a") as handle:
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT).returncode
    if code != 0 or not summary_path.is_file():
        echo(f"{trial.label} seed {trial.seed}: FAILED (exit {code}) after {time.monotonic() - start:.0f} s; see {log}")
        return None
    summary = json.loads(summary_path.read_text())
    echo(f"{trial.label} seed {trial.seed}: final eval {summary['eval']['return_mean']:.1f} in "
         f"{summary['wall_seconds']:.0f} s")
    return summary


@dataclass
class Result:
    trial: Trial
    summary: dict | None

    @property
    def final(self) -> float | None:
        return None if self.summary is None else float(self.summary["eval"]["return_mean"])


def table(results: Sequence[Result], variants: Sequence[str]) -> str:
    """A markdown table: a row per run, then each preset's variants as mean +- std over seeds and as a
    ratio to the first variant's mean."""
    lines = ["| preset | variant | seed | final eval | wall s | updates/s |", "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        if r.summary is None:
            lines.append(f"| {r.trial.preset} | {r.trial.variant} | {r.trial.seed} | failed | | |")
            continue
        s = r.summary
        lines.append(f"| {r.trial.preset} | {r.trial.variant} | {r.trial.seed} | {r.final:.1f} | "
                     f"{s['wall_seconds']:.0f} | {s['throughput']['updates_per_s']:.1f} |")
    lines += ["", "| preset | variant | seeds | mean final eval | std | vs " + variants[0] + " |",
              "| --- | --- | --- | --- | --- | --- |"]
    for preset in dict.fromkeys(r.trial.preset for r in results):
        means = {}
        for variant in variants:
            finals = [r.final for r in results if r.trial.preset == preset and r.trial.variant == variant
                      and r.final is not None]
            if not finals:
                continue
            means[variant] = statistics.fmean(finals)
            spread = statistics.stdev(finals) if len(finals) > 1 else 0.0
            base = means.get(variants[0])
            ratio = f"{means[variant] / base:.2f}x" if base and base > 0 else "n/a"
            lines.append(f"| {preset} | {variant} | {len(finals)} | {means[variant]:.1f} | {spread:.1f} | {ratio} |")
    return "\n".join(lines)


def records(results: Sequence[Result]) -> list[Record]:
    rows = []
    for r in results:
        if r.summary is None:
            continue
        name = f"{r.trial.config} seed {r.trial.seed}"
        rows += [Record("learning", name, "final_eval", r.final, "return"),
                 Record("learning", name, "wall_seconds", float(r.summary["wall_seconds"]), "s"),
                 Record("learning", name, "updates_per_s", float(r.summary["throughput"]["updates_per_s"]),
                        "updates/s")]
    return rows


def plot_curves(results: Sequence[Result], path: Path) -> bool:
    """Eval return over env steps, a panel per preset, a colour per variant, a line per seed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        return False
    presets = list(dict.fromkeys(r.trial.preset for r in results))
    variants = list(dict.fromkeys(r.trial.variant for r in results))
    fig, axes = plt.subplots(1, len(presets), figsize=(5 * len(presets), 3.8), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, preset in zip(axes[0], presets):
        for r in results:
            if r.trial.preset != preset or r.summary is None:
                continue
            curve = r.summary["eval"].get("curve") or []
            colour = colours[variants.index(r.trial.variant) % len(colours)]
            label = r.trial.variant if r.trial.seed == min(x.trial.seed for x in results
                                                            if x.trial.variant == r.trial.variant) else None
            ax.plot([p[0] for p in curve], [p[2] for p in curve], color=colour, marker="o", label=label)
        ax.set_title(preset)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1000:g}k"))
        ax.set_xlabel("env steps")
        ax.set_ylabel("eval return")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run(presets: Sequence[str], variants: Sequence[str], seeds: Sequence[int], steps: int, out: Path,
        extra: Sequence[str] = (), inline: bool = False, echo: Callable[[str], None] = print) -> list[Record]:
    """Run (or read) every trial, then write table.md, records.json and curves.png under `out`."""
    trials = plan(presets, variants, seeds, steps, extra)
    start_reaper()  # the runs started below carry its token: if this process is killed, they stop too
    echo(f"bench learning: {len(trials)} runs of {steps:,} env steps: {', '.join(presets)} x "
         f"{', '.join(variants)} x seeds {', '.join(map(str, seeds))}, one at a time, into {out}")
    results = []
    for trial in trials:
        results.append(Result(trial, run_trial(trial, out, steps, extra, inline, echo)))
        write_outputs(results, list(variants), out)  # after each run: a stopped benchmark keeps its table
    return records(results)


def write_outputs(results: Sequence[Result], variants: list[str], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "table.md", out / "records.json"]
    written[0].write_text(table(results, variants) + "\n")
    written[1].write_text(json.dumps([r.as_dict() for r in records(results)], indent=1) + "\n")
    if plot_curves(results, out / "curves.png"):
        written.append(out / "curves.png")
    return written
