"""A sweep's numbers: per grid point the final eval of each seed, its mean, median and IQM with 95%
stratified bootstrap intervals, the fraction of seeds above a threshold, time and throughput, and each
point's probability of improvement over the first; computed with rliable (Agarwal et al., 2021),
written as `sweep.json` and `sweep.md`."""

from __future__ import annotations

import json
import math
import statistics
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sacfleet.common.io import atomic_write_bytes

REPS = 2000  # bootstrap resamples: intervals stable to about 1% of their width
CONFIDENCE = 0.95
PAIR = ";"  # joins the two points of a comparison (a point's label holds commas)


@dataclass
class TrialResult:
    point: str
    seed: int
    status: str  # finished, failed, or unfinished (not run yet, interrupted)
    outcome: dict

    @property
    def final(self) -> float | None:
        value = self.outcome.get("final_eval") if self.status == "finished" else None
        return None if value is None or not math.isfinite(value) else float(value)


@contextmanager
def quiet_rliable():
    # rliable 1.2 passes arch's bootstraps the `random_state` keyword, which arch 7 deprecates.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="random_state is deprecated", category=FutureWarning)
        yield


def interval_estimates(finals: list[float], seed: int = 0) -> dict:
    """Mean, median and IQM of one point's final evals, each with its 95% stratified bootstrap interval."""
    from rliable import library as rly
    from rliable import metrics

    scores = np.asarray(finals, dtype=float).reshape(-1, 1)  # runs x tasks: one task, the preset

    def aggregates(x: np.ndarray) -> np.ndarray:
        # rliable's aggregate_median is the median over tasks of per-task means; over one task's seeds
        # the median of the seeds is meant.
        return np.array([metrics.aggregate_mean(x), np.median(x), metrics.aggregate_iqm(x)])

    with quiet_rliable():
        point, interval = rly.get_interval_estimates({"p": scores}, aggregates, reps=REPS,
                                                     confidence_interval_size=CONFIDENCE,
                                                     random_state=np.random.RandomState(seed))
    return {name: {"value": float(point["p"][i]), "ci": [float(interval["p"][0, i]), float(interval["p"][1, i])]}
            for i, name in enumerate(("mean", "median", "iqm"))}


def above_threshold(finals: list[float], threshold: float, seed: int = 0) -> dict:
    """The fraction of seeds whose final eval is above `threshold`, with its 95% bootstrap interval
    (rliable's score distribution at tau = threshold)."""
    from rliable import library as rly

    np.random.seed(seed)  # create_performance_profile draws from numpy's global generator
    with quiet_rliable():
        profile, interval = rly.create_performance_profile({"p": np.asarray(finals, dtype=float).reshape(-1, 1)},
                                                           [threshold], reps=REPS, confidence_interval_size=CONFIDENCE)
    return {"threshold": threshold, "fraction": float(profile["p"][0]),
            "ci": [float(interval["p"][0][0]), float(interval["p"][1][0])]}


def improvement(finals_x: list[float], finals_y: list[float], seed: int = 0) -> dict:
    """P(X > Y): the probability that a seed of point X ends above a seed of point Y, with its interval."""
    from rliable import library as rly
    from rliable import metrics

    pair = {f"x{PAIR}y": (np.asarray(finals_x, dtype=float).reshape(-1, 1),
                          np.asarray(finals_y, dtype=float).reshape(-1, 1))}
    with quiet_rliable():
        point, interval = rly.get_interval_estimates(pair, metrics.probability_of_improvement, reps=REPS,
                                                     confidence_interval_size=CONFIDENCE,
                                                     random_state=np.random.RandomState(seed))
    key = f"x{PAIR}y"
    return {"value": float(point[key]), "ci": [float(interval[key][0][0]), float(interval[key][1][0])]}


def aggregate(results: list[TrialResult], points: list[tuple[str, tuple[str, ...]]], threshold: float | None) -> dict:
    """sweep.json's `points` and `comparisons` from the trials' results."""
    rows = []
    for label, overrides in points:
        mine = [r for r in results if r.point == label]
        finals = [r.final for r in mine if r.final is not None]
        finished = [r for r in mine if r.status == "finished"]
        row = {"point": label, "overrides": list(overrides), "seeds": len(mine), "finished": len(finals),
               "failed": sum(r.status == "failed" for r in mine),
               "unfinished": sum(r.status not in ("finished", "failed") for r in mine),
               "finals": {str(r.seed): r.final for r in mine if r.final is not None}}
        if finals:
            row.update(interval_estimates(finals))
            if threshold is not None:
                row["above_threshold"] = above_threshold(finals, threshold)
            row["wall_seconds"] = statistics.fmean(r.outcome["wall_seconds"] for r in finished)
            rates = [r.outcome["updates_per_s"] for r in finished if r.outcome.get("updates_per_s") is not None]
            steps = [r.outcome["env_steps_per_s"] for r in finished if r.outcome.get("env_steps_per_s") is not None]
            row["updates_per_s"] = statistics.fmean(rates) if rates else None
            row["env_steps_per_s"] = statistics.fmean(steps) if steps else None
        rows.append(row)
    comparisons = []
    base = rows[0] if rows else None
    for row in rows[1:]:
        if base["finished"] and row["finished"]:
            comparisons.append({"point": row["point"], "over": base["point"],
                                "probability_of_improvement": improvement(list(row["finals"].values()),
                                                                          list(base["finals"].values()))})
    return {"points": rows, "comparisons": comparisons}


def trial_rows(results: list[TrialResult]) -> list[dict]:
    out = []
    for r in results:
        o = r.outcome
        out.append({"point": r.point, "seed": r.seed, "status": r.status, "final_eval": r.final,
                    "cause": o.get("cause"), "wall_seconds": o.get("wall_seconds"),
                    "updates_per_s": o.get("updates_per_s"), "env_steps": o.get("env_steps"),
                    "health": o.get("health"), "node": o.get("node"), "run_dir": o.get("run_dir"),
                    "curve": o.get("curve") or []})
    return out


def _ci(stat: dict) -> str:
    return f"{stat['value']:.2f} [{stat['ci'][0]:.2f}, {stat['ci'][1]:.2f}]"


def _num(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def markdown(report: dict) -> str:
    """sweep.md: a row per trial, a row per grid point (with intervals), and the comparisons."""
    # The node column only where the trials ran on more than one node (the start of each node's id).
    nodes = len({t.get("node") for t in report["trials"] if t.get("node")}) > 1
    lines = ["| point | seed | status | final eval | wall s | updates/s | health |" + (" node |" if nodes else ""),
             "| --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if nodes else "")]
    for t in report["trials"]:
        status = t["status"] if t["status"] != "failed" else f"FAILED: {t['cause']}"
        lines.append(f"| {t['point']} | {t['seed']} | {status} | {_num(t['final_eval'], '.2f')} | "
                     f"{_num(t['wall_seconds'], '.0f')} | {_num(t['updates_per_s'], '.0f')} | {t['health'] or ''} |"
                     + (f" {(t.get('node') or '')[:6]} |" if nodes else ""))
    threshold = report.get("threshold")
    head = "| point | seeds | mean [95% CI] | median [95% CI] | IQM [95% CI] |"
    rule = "| --- | --- | --- | --- | --- |"
    if threshold is not None:
        head += f" above {threshold:g} [95% CI] |"
        rule += " --- |"
    lines += ["", head + " wall s | updates/s |", rule + " --- | --- |"]
    for p in report["points"]:
        seeds = f"{p['finished']} of {p['seeds']}" + (f" ({p['failed']} failed)" if p["failed"] else "")
        if not p["finished"]:
            lines.append(f"| {p['point']} | {seeds} | | | |" + (" |" if threshold is not None else "") + " | |")
            continue
        row = f"| {p['point']} | {seeds} | {_ci(p['mean'])} | {_ci(p['median'])} | {_ci(p['iqm'])} |"
        if threshold is not None:
            a = p["above_threshold"]
            row += f" {a['fraction']:.2f} [{a['ci'][0]:.2f}, {a['ci'][1]:.2f}] |"
        lines.append(row + f" {p['wall_seconds']:.0f} | {_num(p['updates_per_s'], '.0f')} |")
    if report["comparisons"]:
        lines.append("")
        for c in report["comparisons"]:
            poi = c["probability_of_improvement"]
            lines.append(f"P({c['point']} > {c['over']}) = {poi['value']:.2f} [{poi['ci'][0]:.2f}, {poi['ci'][1]:.2f}]")
    return "\n".join(lines)


def write_report(report: dict, sweep_dir: Path) -> list[Path]:
    """sweep.json and sweep.md, each replaced whole."""
    written = []
    for name, text in (("sweep.json", json.dumps(report, indent=1)), ("sweep.md", markdown(report))):
        path = Path(sweep_dir) / name
        atomic_write_bytes(path, (text + "\n").encode())
        written.append(path)
    return written
