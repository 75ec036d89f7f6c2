"""Bench output: the table printed for people, the JSON records, and one PNG plot per suite."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from sacfleet.bench import Record

COLUMNS = ("suite", "name", "device", "batch_size", "actors", "metric", "value", "unit")


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def format_table(records: Sequence[Record]) -> str:
    rows = [COLUMNS] + [tuple(_cell(r.as_dict()[c]) for c in COLUMNS) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    numeric = {COLUMNS.index("value"), COLUMNS.index("batch_size"), COLUMNS.index("actors")}
    lines = ["  ".join(cell.rjust(w) if i in numeric else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def to_json(records: Sequence[Record]) -> str:
    return json.dumps([r.as_dict() for r in records], indent=1)


def write_outputs(records: Sequence[Record], out_dir: Path, header: str) -> list[Path]:
    """records.json, table.txt and a plot per suite (plots skipped, with a note, without matplotlib)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "records.json", out_dir / "table.txt"]
    written[0].write_text(to_json(records) + "\n")
    written[1].write_text(f"{header}\n\n{format_table(records)}\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    by_suite: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        by_suite[record.suite].append(record)
    for suite, rows in by_suite.items():
        path = out_dir / f"{suite}.png"
        _plot_suite(plt, suite, rows, path, header)
        written.append(path)
    return written


X_AXIS = {"learner": "batch_size", "actors": "actors", "e2e": "actors"}  # other suites: bars


def _plot_suite(plt, suite: str, rows: list[Record], path: Path, header: str) -> None:
    """One panel per metric family ("seconds: a" and "seconds: b" share one): a line per series
    over the suite's x axis (batch size or actor count), else bars. Records without a value on the
    x axis (the actors suite's weight pulls) get bar panels of their own."""
    x_key = X_AXIS.get(suite)
    panels: dict[tuple[str, str, bool], list[Record]] = defaultdict(list)
    for r in rows:
        panels[(r.metric.split(":")[0], r.unit, x_key is not None and getattr(r, x_key) is not None)].append(r)
    cols = min(len(panels), 3)
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 4 * nrows), squeeze=False)
    for ax, ((metric, unit, lines), recs) in zip(axes.flat, panels.items()):
        series: dict[str, list[Record]] = defaultdict(list)
        for r in recs:
            part = r.metric.split(":", 1)[1].strip() if ":" in r.metric else ""
            series[" ".join(str(p) for p in (r.name, r.device, part) if p)].append(r)
        if not lines:
            labels = list(series)
            ax.bar(range(len(labels)), [series[k][0].value for k in labels])
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
        else:
            for label, points in series.items():
                points.sort(key=lambda r: getattr(r, x_key))
                ax.plot([getattr(r, x_key) for r in points], [r.value for r in points], marker="o", label=label)
            ax.set_xlabel(x_key.replace("_", " "))
            if x_key == "batch_size":
                ax.set_xscale("log", base=2)
            else:
                ax.set_xticks(sorted({getattr(r, x_key) for r in recs}))
            ax.set_ylim(bottom=0)
            ax.legend(fontsize=7)
        ax.set_title(metric, fontsize=9)
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"sacfleet bench {suite}: {header}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
