"""What a run reports, for the fleet and the in-process trainer alike: progress lines, records in
metrics.jsonl and TensorBoard, the health checks that watch those records, the evaluation curve,
and at the end summary.json (its common part, then each component's section), the plots and the
`done` line."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from sacfleet.common.config import Config, to_dict
from sacfleet.common.health import HealthMonitor, RunFacts
from sacfleet.common.io import atomic_write_bytes
from sacfleet.common.metrics import EpisodeStats, MetricsLogger
from sacfleet.common.plots import write_plots
from sacfleet.driver.checkpoint_files import BestPolicy

INTERRUPTED = "interrupted"  # the stop reason of a run stopped by Ctrl-C or SIGTERM


def her_values(shard_stats: Sequence[Mapping]) -> dict[str, float]:
    """The share of sampled transitions the shards relabeled (`stats()` of tables or shards); nothing
    without hindsight relabeling."""
    sampled = sum(s["her_sampled"] for s in shard_stats)
    return {"replay/her_relabeled_fraction": sum(s["her_relabeled"] for s in shard_stats) / sampled} if sampled else {}


def replay_ratio(stats: Sequence[Mapping]) -> float:
    """Samples per insert the replay has held (`stats()` of tables or shards): the inserts before
    sampling may start are not counted, so a run's ratio can reach its target."""
    effective = sum(s["inserts"] - s["min_size_to_sample"] for s in stats)
    return sum(s["samples"] for s in stats) / effective if effective > 0 else float("nan")


def ratio_inserts(stats: Sequence[Mapping]) -> int:
    """The inserts `replay_ratio` divides by: a shard restored from an early snapshot counts from its
    snapshot again, so this can fall while env steps grow."""
    return sum(s["inserts"] - s["min_size_to_sample"] for s in stats)


def replay_section(stats: Sequence[Mapping], target: float) -> dict:
    """The replay's part of summary.json, from the `stats()` of its tables or shards."""
    return {"size": sum(s["size"] for s in stats), "samples_per_insert": replay_ratio(stats),
            "samples_per_insert_target": target}


def success_note(success_rate: float | None) -> str:
    """", success rate 0.97" for a final line, or nothing for envs without a success flag."""
    return "" if success_rate is None else f", success rate {success_rate:.2f}"


@dataclass(frozen=True)
class Point:
    """Run totals at one moment; rates are computed between two of them."""

    env_steps: int
    updates: int
    wall: float
    inserts: int = 0
    samples: int = 0


class Reporter:
    def __init__(self, cfg: Config, run_dir: Path, echo: Callable[[str], None], *, act_dim: int, fleet: bool,
                 start: Point, evals: Sequence | None = None):
        self.cfg, self.run_dir, self.echo = cfg, Path(run_dir), echo
        self.metrics = MetricsLogger(run_dir, on_error=echo)
        self.episodes = EpisodeStats()
        self.health = HealthMonitor(RunFacts.from_config(cfg, act_dim, fleet), cfg.health)
        self.last = start
        # [env_steps, wall_seconds, mean return] or, for envs reporting is_success, [..., success rate]
        self.evals: list = [list(row) for row in evals or []]

    def progress(self, now: Point, values: Mapping[str, float], note: str = "") -> dict:
        """Log one progress record (rates since the last one, episode returns, the trainer's `values`
        and the health checks' readings), print its line, and any health warning that starts with it."""
        last = self.last
        span = max(now.wall - last.wall, 1e-9)
        fps = (now.env_steps - last.env_steps) / span
        record = {**values, **self.episodes.summary(), **self.episodes.recent_mean(),
                  "train/n_updates": now.updates, "time/fps": fps,
                  "actors/env_steps_per_s": fps, "learner/updates_per_s": (now.updates - last.updates) / span,
                  "replay/inserts_per_s": (now.inserts - last.inserts) / span,
                  "replay/samples_per_s": (now.samples - last.samples) / span}
        started = self.health.observe(now.env_steps, record)
        record.update(self.health.values())
        self.metrics.log(now.env_steps, now.wall, record)
        self.last = now
        self.echo(self.progress_line(now, record) + note)
        for warning in started:
            self.echo(warning.line())
        return record

    def progress_line(self, now: Point, record: Mapping[str, float]) -> str:
        total = self.cfg.train.total_env_steps
        parts = [f"steps {now.env_steps:>9,}/{total:,}", f"updates {now.updates:>9,}"]
        if "rollout/ep_rew_mean" in record:
            parts.append(f"ep_rew_mean {record['rollout/ep_rew_mean']:9.1f}")
        if "rollout/success_rate" in record:
            parts.append(f"success {record['rollout/success_rate']:4.2f}")
        if self.evals:
            last = self.evals[-1]
            parts.append(f"eval {last[2]:9.1f}" + (f" success {last[3]:4.2f}" if len(last) > 3 else ""))
        fps = record["time/fps"]
        parts += [f"{fps:6.0f} steps/s", f"{record['learner/updates_per_s']:6.0f} updates/s"]
        if "replay/samples_per_insert" in record:
            parts.append(f"ratio {record['replay/samples_per_insert']:6.1f}")
        if "learner/policy_lag" in record:
            parts.append(f"lag {record['learner/policy_lag']:5.1f}")
        if record.get("fleet/actors", self.cfg.actors.num) != self.cfg.actors.num:
            parts.append(f"actors {record['fleet/actors']:.0f}")
        if record.get("actors/restarts"):
            hung = f" ({record['actors/hung']:.0f} hung)" if record.get("actors/hung") else ""
            parts.append(f"restarts {record['actors/restarts']:.0f}{hung}")
        if record.get("fleet/recoveries"):
            hung = f"{record['fleet/hung']:.0f} hung; " if record.get("fleet/hung") else ""
            parts.append(f"recovered {record['fleet/recoveries']:.0f} ({hung}lost "
                         f"{record['fleet/lost_transitions']:,.0f} transitions, {record['fleet/lost_updates']:,.0f} "
                         f"updates)")
        parts.append(f"eta {(total - now.env_steps) / fps:5.0f}s" if fps > 0 else "eta     ?")
        active = self.health.active()
        if active:
            parts.append(f"health: {', '.join(active)}")
        return " | ".join(parts)

    def watch(self, now: Point, values: Mapping[str, float]) -> None:
        """Health checks between progress records (the fleet's stalls show up when no steps are made,
        so no record would come); a warning that starts is printed and recorded at once."""
        started = self.health.observe(now.env_steps, values)
        if started:
            self.metrics.log(now.env_steps, now.wall, self.health.values())
            for warning in started:
                self.echo(warning.line())

    def evaluation(self, env_steps: int, wall: float, returns: Sequence[float],
                   success_rate: float | None = None) -> tuple[float, float]:
        """Record an evaluation's returns (and success rate, for envs that report one); returns the
        returns' mean and standard deviation."""
        mean = sum(returns) / len(returns)
        std = math.sqrt(sum((r - mean) ** 2 for r in returns) / len(returns))
        self.evals.append([env_steps, round(wall, 2), mean] + ([success_rate] if success_rate is not None else []))
        record = {"eval/mean_reward": mean, "eval/std_reward": std}
        if success_rate is not None:
            record["eval/success_rate"] = success_rate
        started = self.health.observe(env_steps, record)
        self.metrics.log(env_steps, wall, record)
        for warning in started:  # return_collapsed warns on an evaluation
            self.echo(warning.line())
        return mean, std

    def diverged(self, now: Point, update: int, what: str, reason: str, mode: str) -> None:
        """A diverged learner ends the run: its record, then summary.json (no final evaluation)."""
        self.health.diverged(update, what, now.env_steps)
        self.metrics.log(now.env_steps, now.wall, {**self.health.values(), "health/diverged_at_update": update})
        self.failure_summary(now, reason, mode)
        self.close()

    def finish(self, *, mode: str, stop_reason: str, now: Point, final: Mapping, sections: Mapping,
               stage_seconds: Mapping[str, float], best: BestPolicy | None = None, failed: bool = False) -> dict:
        """A run's end: summary.json, the common part (counters, why it stopped, the final evaluation
        `final`: {"returns", "mean", "std", "success_rate"} and, from a fleet, the policy "version" it
        evaluated; the best evaluation, and `best`: the policy checkpoint.best kept) followed by the
        trainer's and its components' `sections`; then the plots and the `done` line. Returns the summary.
        `failed`: the run stopped early because something kept failing (the stop reason says what)."""
        self.close()
        evaluation = {"return_mean": final["mean"], "return_std": final["std"], "episodes": len(final["returns"]),
                      "success_rate": final.get("success_rate")}
        if "version" in final:
            evaluation["policy_version"] = final["version"]
        evaluation.update(self.best_evaluation(final["mean"], best))
        summary = self.write_summary({
            "env_steps": now.env_steps, "updates": now.updates, "wall_seconds": round(now.wall, 2),
            "stop_reason": stop_reason, "interrupted": stop_reason == INTERRUPTED, "failed": failed, "mode": mode,
            "eval": {**evaluation, "curve": self.evals}, **sections, "config": to_dict(self.cfg),
            "python": sys.version.split()[0], "torch": torch.__version__})
        try:
            plots = write_plots(self.run_dir, self.evals, stage_seconds, self.cfg.env.id)
        except OSError as exc:
            self.echo(f"plots not written: {exc.strerror or exc}")
            plots = []
        self.echo(done_line(summary, self.run_dir / "summary.json", plots))
        return summary

    def best_evaluation(self, final_mean: float, best: BestPolicy | None) -> dict:
        """The best evaluation before the final one, whether the final policy fell far below it (the
        return_collapsed check's limit), and the policy file checkpoint.best kept."""
        earlier = self.evals[:-1]
        if not earlier:
            return {}
        steps, _, mean = max(earlier, key=lambda row: row[2])[:3]
        kept = best.best if best is not None else None
        return {"best": {"return_mean": mean, "env_steps": steps, "kept": str(best.path) if kept else None,
                         "kept_return_mean": kept["return_mean"] if kept else None},
                "final_below_best": final_mean < self.health.collapse_limit(mean)}

    def write_summary(self, summary: dict) -> dict:
        """summary.json: the trainer's `summary` with the health section added. A summary that cannot be
        written (a full disk) is still returned, with `summary_not_written` saying why."""
        summary = {**summary, "health": self.health.summary()}
        try:
            atomic_write_bytes(self.run_dir / "summary.json", json.dumps(summary, indent=2).encode())
        except OSError as exc:
            summary["summary_not_written"] = str(exc)
        return summary

    def failure_summary(self, now: Point, reason: str, mode: str) -> dict:
        """summary.json of a run that stopped without a final evaluation (a diverged learner)."""
        return self.write_summary({
            "env_steps": now.env_steps, "updates": now.updates, "wall_seconds": round(now.wall, 2),
            "stop_reason": reason, "failed": True, "interrupted": False, "mode": mode,
            "eval": {"return_mean": None, "return_std": None, "episodes": 0, "curve": self.evals},
            "config": to_dict(self.cfg)})

    def close(self) -> None:
        self.metrics.close()


def done_line(summary: Mapping, path: Path, plots: Sequence[Path]) -> str:
    """A run's last line, from its summary: why it stopped, what it did how fast, how well the final
    policy does, its health and recoveries, and where the summary and plots are."""
    rates, replay, final, health = summary["throughput"], summary["replay"], summary["eval"], summary["health"]
    wall = summary.get("session_wall_seconds", summary["wall_seconds"])
    warnings = f" ({', '.join(w['check'] for w in health['warnings'])})" if health["warnings"] else ""
    recovery = summary.get("recovery") or {"failures": 0, "recoveries": 0}  # the inline trainer has none
    recovered = (f"; recovered {recovery['recoveries']} processes from {recovery['failures']} failures"
                 if recovery["recoveries"] != recovery["failures"] else
                 f"; recovered from {recovery['failures']} failures" if recovery["failures"] else "")
    if recovery.get("hung"):
        recovered += f" ({recovery['hung']} hung)"
    where = (f"summary NOT written ({summary['summary_not_written']})" if "summary_not_written" in summary
             else f"summary {path}")
    below = ""
    if final.get("final_below_best"):
        best = final["best"]
        kept = f" (kept in {best['kept']}: sacfleet eval --best)" if best["kept"] else ""
        below = (f", far below the run's best evaluation {best['return_mean']:.1f} at {best['env_steps']:,} env "
                 f"steps{kept}")
    return (f"done ({summary['stop_reason']}): {summary['env_steps']:,} env steps, {summary['updates']:,} updates in "
            f"{wall:.1f}s ({rates['env_steps_per_s']:.0f} steps/s, {rates['updates_per_s']:.0f} updates/s, "
            f"replay ratio {replay['samples_per_insert']:.1f} of {replay['samples_per_insert_target']:g}); eval return "
            f"{final['return_mean']:.1f} +- {final['return_std']:.1f} over {final['episodes']} episodes"
            f"{success_note(final['success_rate'])}{below}; health {health['status']}{warnings}{recovered}; "
            f"{where}"
            f"{'; plots ' + ', '.join(p.name for p in plots) if plots else ''}")
