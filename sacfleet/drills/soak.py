"""`sacfleet soak`: a long run at full load whose every process's memory is sampled; reports which grew
after the warm-up."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from sacfleet.drills.child_run import ChildRun


def soak(train_args: list[str], run_dir: Path, minutes: float, warmup_minutes: float, sample_every: float,
         echo: Callable[[str], None]) -> dict:
    """Run for `minutes` and sample every process's resident memory every `sample_every` seconds;
    report each process's growth from the end of the warm-up to its largest later sample. Writes
    run_dir/memory.csv and run_dir/soak.json."""
    child = ChildRun([*train_args, "--run-dir", str(run_dir), "--set", "train.total_env_steps=1000000000",
                      "--set", f"train.max_wall_seconds={minutes * 60:g}"], echo)
    samples: dict[int, list[tuple[float, int]]] = {}
    kinds: dict[int, str] = {}
    start = time.monotonic()
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(run_dir) / "memory.csv", "w") as csv:
        csv.write("seconds,pid,process,rss_bytes\n")
        try:
            _sample(child, start, sample_every, samples, kinds, csv)
        except BaseException:
            child.stop(interrupt=True)
            raise
    code = child.stop()
    warm = warmup_minutes * 60
    rows = []
    for pid, series in samples.items():
        after = [rss for t, rss in series if t >= warm]
        if len(after) < 2:
            continue
        base = after[0]
        rows.append({"pid": pid, "process": kinds[pid], "rss_at_warmup_mb": round(base / 2**20, 1),
                     "rss_max_after_mb": round(max(after) / 2**20, 1), "rss_end_mb": round(after[-1] / 2**20, 1),
                     "growth": round(max(after) / base - 1, 4), "samples": len(after)})
    rows.sort(key=lambda r: (r["process"], r["pid"]))
    report = {"exit_code": code, "minutes": minutes, "warmup_minutes": warmup_minutes, "processes": rows,
              "max_growth": max((r["growth"] for r in rows), default=None),
              "within_5_percent": bool(rows) and all(r["growth"] <= 0.05 for r in rows)}
    (Path(run_dir) / "soak.json").write_text(json.dumps(report, indent=2))
    return report


def _sample(child: ChildRun, start: float, every: float, samples: dict, kinds: dict, csv) -> None:
    """Until the run starts stopping: its final checkpoint, evaluation and plots are a one-off, not
    the steady state a soak measures (the driver grew by 40 MB there in an 8-minute soak)."""
    while child.running() and not any(line.startswith("stopping (") for line in child.lines):
        now = time.monotonic() - start
        for proc in child.processes():
            rss = _rss(proc.pid)
            if rss is None:
                continue
            samples.setdefault(proc.pid, []).append((now, rss))
            kinds[proc.pid] = proc.kind
            csv.write(f"{now:.0f},{proc.pid},{proc.kind},{rss}\n")
        csv.flush()
        child.wait_for(lambda line: False, timeout=every)


def _rss(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
