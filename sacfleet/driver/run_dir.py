"""The run directory a trainer writes into, and progress output that reaches logs as it happens."""

from __future__ import annotations

from pathlib import Path

from sacfleet.driver.errors import RunRefused


class RunDirInUse(RunRefused):
    """The run directory already holds another run's outputs, which a new run would overwrite."""


def check_run_dir(run_dir: Path) -> None:
    taken = [name for name in ("summary.json", "checkpoints", "metrics.jsonl") if (Path(run_dir) / name).exists()]
    if taken:
        raise RunDirInUse(f"run directory {run_dir} already holds a run ({', '.join(taken)}); "
                          f"choose another --run-dir, or continue that run with --resume")


def echo_flush(line: str) -> None:
    """Progress lines reach a log file or pipe as they happen, not when a buffer fills."""
    print(line, flush=True)
