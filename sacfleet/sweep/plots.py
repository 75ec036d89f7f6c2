"""A sweep's figures: `curves.png`, the eval curves of each grid point (each seed faint, the mean over
seeds bold with its 95% bootstrap band), and `compare.png`, each point's IQM with its interval and,
with two points or more, the probability of improvement over the first (rliable's plots)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sacfleet.sweep.stats import CONFIDENCE, PAIR, REPS, quiet_rliable


def common_steps(curves: list[list]) -> np.ndarray:
    """The env steps every seed's curve spans: each evaluation's steps, from the latest first one to the
    earliest last one (a fleet evaluates at slightly different steps per seed)."""
    starts = [c[0][0] for c in curves]
    ends = [c[-1][0] for c in curves]
    steps = sorted({p[0] for c in curves for p in c})
    lo, hi = max(starts), min(ends)
    return np.array([s for s in steps if lo <= s <= hi] or [hi], dtype=float)


def on_steps(curve: list, steps: np.ndarray) -> np.ndarray:
    """A seed's eval returns at `steps`, interpolated; an env step evaluated twice keeps its last."""
    last = {p[0]: p[2] for p in curve}
    xs = np.array(sorted(last), dtype=float)
    return np.interp(steps, xs, [last[x] for x in xs])


def mean_band(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per column of `values` (seeds x steps): the mean over seeds and its 95% bootstrap interval."""
    from rliable import library as rly
    from rliable import metrics

    if values.shape[0] < 2:
        return values[0], values[0], values[0]
    scores = {str(i): values[:, [i]] for i in range(values.shape[1])}
    with quiet_rliable():
        point, interval = rly.get_interval_estimates(scores, metrics.aggregate_mean, reps=REPS // 4,
                                                     confidence_interval_size=CONFIDENCE,
                                                     random_state=np.random.RandomState(0))
    keys = [str(i) for i in range(values.shape[1])]
    return (np.array([float(np.ravel(point[k])[0]) for k in keys]),
            np.array([float(np.ravel(interval[k])[0]) for k in keys]),
            np.array([float(np.ravel(interval[k])[1]) for k in keys]))


def plot_curves(trials: list[dict], points: list[str], title: str, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn = False
    every = []
    for i, point in enumerate(points):
        colour = colours[i % len(colours)]
        curves = [t["curve"] for t in trials if t["point"] == point and t["status"] == "finished" and t["curve"]]
        for curve in curves:
            ax.plot([p[0] for p in curve], [p[2] for p in curve], color=colour, alpha=0.35, linewidth=1.0)
            every += [p[2] for p in curve]
        if not curves:
            continue
        steps = common_steps(curves)
        mean, low, high = mean_band(np.stack([on_steps(c, steps) for c in curves]))
        ax.plot(steps, mean, color=colour, linewidth=2.2, marker="o", markersize=3,
                label=f"{point} (mean of {len(curves)} seeds, 95% CI)")
        ax.fill_between(steps, low, high, color=colour, alpha=0.2, linewidth=0)
        drawn = True
    if not drawn:
        plt.close(fig)
        return False
    values = np.abs(np.array(every))
    if values.size and values.max() > 100 * max(np.median(values), 1e-9):
        # One collapsed seed (returns 10^5 below the rest) would flatten every other curve to a line.
        ax.set_yscale("symlog", linthresh=max(float(np.median(values)), 1e-3))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1000:g}k"))
    ax.set_xlabel("env steps")
    ax.set_ylabel("eval return (deterministic policy)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_compare(report: dict, path: Path) -> bool:
    """Each point's IQM of final evals with its 95% interval; beside it, with two points or more, the
    probability that a seed of each point ends above a seed of the first (rliable's plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    rows = [p for p in report["points"] if p["finished"]]
    if not rows:
        return False
    pairs = report["comparisons"]
    fig, axes = plt.subplots(1, 2 if pairs else 1, figsize=(11 if pairs else 6, 1.2 + 0.45 * len(rows)),
                             squeeze=False)
    ax = axes[0][0]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, p in enumerate(rows):
        value, (low, high) = p["iqm"]["value"], p["iqm"]["ci"]
        ax.barh(i, high - low, left=low, height=0.6, color=colours[i % len(colours)], alpha=0.6)
        ax.plot([value, value], [i - 0.3, i + 0.3], color="black", linewidth=2)
        seeds = list(p["finals"].values())
        ax.scatter(seeds, np.full(len(seeds), i), color="black", s=9, alpha=0.6, zorder=3)
    ax.set_yticks(range(len(rows)), [f"{p['point']} ({p['finished']} seeds)" for p in rows], fontsize=8)
    ax.invert_yaxis()
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.set_xlabel("final eval return: IQM (line), its 95% CI (bar), seeds (dots)")
    ax.grid(axis="x", alpha=0.3)
    if pairs:
        from rliable import plot_utils

        keys = [f"{c['point']}{PAIR}{c['over']}" for c in pairs]
        poi = [c["probability_of_improvement"] for c in pairs]
        plot_utils.plot_probability_of_improvement(
            {k: np.array([q["value"]]) for k, q in zip(keys, poi)},
            {k: np.array([[q["ci"][0]], [q["ci"][1]]]) for k, q in zip(keys, poi)},
            pair_separator=PAIR, ax=axes[0][1], xlabel="P(a seed of X ends above one of Y)",
            left_ylabel="X", right_ylabel="Y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
