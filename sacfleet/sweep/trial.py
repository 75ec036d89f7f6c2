"""One trial of a sweep, as a Ray Tune function trainable: a complete `sacfleet train` in a child process
(in-process trainer, or a fleet in the placement group Tune reserved for the trial), its progress
reported to Tune, its outcome kept beside its run directory. A trial finished before is read, not
rerun; an unfinished fleet run resumes from its last checkpoint."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from sacfleet.common.config import ConfigError, load_config
from sacfleet.common.io import atomic_write_bytes
from sacfleet.sweep.spec import SweepSpec, Trial, trial_dir

POLL_S = 1.0
FINISHED, FAILED = "finished", "failed"


class TrialFailed(RuntimeError):
    """The trial's run failed; the message is its cause."""


class TrialInterrupted(RuntimeError):
    """The sweep was stopped before the trial finished: rerunning the sweep continues it."""


class SweepControl:
    """A sweep's stop switch, a Ray actor that every trial polls, on whichever node it runs."""

    def __init__(self):
        self.stopping = False

    def stop(self) -> None:
        self.stopping = True

    def is_stopping(self) -> bool:
        return self.stopping


@dataclass(frozen=True)
class TrialFiles:
    run_dir: Path

    @property
    def log(self) -> Path:
        return self.run_dir.with_suffix(".log")

    @property
    def outcome(self) -> Path:
        return self.run_dir.with_suffix(".json")

    def read_outcome(self) -> dict | None:
        try:
            return json.loads(self.outcome.read_text())
        except (OSError, ValueError):
            return None

    def write_outcome(self, outcome: dict) -> None:
        atomic_write_bytes(self.outcome, json.dumps(outcome, indent=1).encode())


def outcome_of(summary: dict | None, code: int, log_tail: list[str]) -> dict:
    """What a child run that exited amounts to: finished (with its final eval, curve and rates), failed
    (with its cause), or interrupted (stopped by the sweep before its end)."""
    if summary is not None and summary.get("interrupted"):
        return {"status": "interrupted"}
    # A summary without failure is a run that reached its end, even if its process was stopped after
    # writing it (the sweep's stop can come as it exits).
    if summary is not None and not summary.get("failed"):
        throughput = summary.get("throughput", {})
        return {"status": FINISHED, "final_eval": summary["eval"]["return_mean"],
                "success_rate": summary["eval"].get("success_rate"), "curve": summary["eval"].get("curve") or [],
                "env_steps": summary["env_steps"], "wall_seconds": summary["wall_seconds"],
                "updates_per_s": throughput.get("updates_per_s"), "env_steps_per_s": throughput.get("env_steps_per_s"),
                "health": summary.get("health", {}).get("status")}
    return {"status": FAILED, "cause": failure_cause(summary, code, log_tail),
            "curve": (summary or {}).get("eval", {}).get("curve") or []}


def failure_cause(summary: dict | None, code: int, log_tail: list[str]) -> str:
    if summary is not None and summary.get("failed"):
        return str(summary.get("stop_reason"))
    said = [line for line in log_tail if line.startswith("sacfleet train:")]
    if said:
        return said[-1].removeprefix("sacfleet train:").strip()
    last = [line for line in log_tail if line.strip()]
    name = signal.Signals(-code).name if code < 0 else None
    return (f"killed by {name}" if name else f"exit {code}") + (f"; last line: {last[-1].strip()}" if last else "")


def run_trial(config: dict, *, spec: dict, sweep_dir: str, control, address: str | None) -> None:
    """The Tune trainable: `config["trial"]` holds the trial's point, overrides and seed."""
    import ray
    from ray import tune

    sweep = SweepSpec.from_dict(spec)
    trial = Trial(config["trial"]["point"], tuple(config["trial"]["overrides"]), int(config["trial"]["seed"]))
    files = TrialFiles(trial_dir(Path(sweep_dir), trial))
    done = files.read_outcome()
    if done and done["status"] == FINISHED:
        tune.report({"status": FINISHED, **_result(done)})
        return
    if done and done["status"] == FAILED:
        raise TrialFailed(done["cause"])
    if _stopping(control):
        raise TrialInterrupted("the sweep is stopping")
    command = _command(sweep, trial, files.run_dir, address)
    files.run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(files.log, "a") as log:
        log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(command)}\n")
        log.flush()
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                 env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=_stop_with_parent)
    code = _watch(child, files.run_dir, control, tune.report)
    summary = _read_json(files.run_dir / "summary.json") if files.run_dir.exists() else None
    outcome = outcome_of(summary, code, _tail(files.log))
    # A run the sweep's stop cut short before it wrote its summary is unfinished, not failed.
    cut_short = outcome["status"] == FAILED and summary is None and code != 0 and _stopping(control)
    if outcome["status"] == "interrupted" or cut_short:
        raise TrialInterrupted("the sweep was stopped; rerun it to continue this trial")
    files.write_outcome({"point": trial.point, "seed": trial.seed, "run_dir": str(files.run_dir),
                         "node": ray.get_runtime_context().get_node_id(), **outcome})
    if outcome["status"] == FAILED:
        raise TrialFailed(outcome["cause"])
    tune.report({"status": FINISHED, **_result(outcome)})


def _command(sweep: SweepSpec, trial: Trial, run_dir: Path, address: str | None) -> list[str]:
    base = [sys.executable, "-m", "sacfleet", "train"]
    if not sweep.fleet:
        if run_dir.exists():  # an in-process run cannot resume: it starts again
            shutil.rmtree(run_dir)
        overrides = sweep.trial_overrides(trial)
        try:
            threads = load_config(sweep.config, overrides).learner.num_threads
        except ConfigError:  # the run refuses its config and says why, as the trial's cause
            threads = 1
        if not threads:
            # torch's default takes every core of the node, which the trials beside this one share.
            overrides.append(f"learner.num_threads={max(1, int(sweep.cpus_per_trial))}")
        return [*base, "--inline", "--config", sweep.config, "--run-dir", str(run_dir),
                *[a for o in overrides for a in ("--set", o)]]
    import ray

    group = ray.get_runtime_context().get_placement_group_id()
    where = ["--address", address or ray.get_runtime_context().gcs_address,
             *(["--placement-group", f"{group}:1"] if group else [])]
    if (run_dir / "checkpoints" / "checkpoint.pt").is_file():
        return [*base, "--resume", str(run_dir), *where]
    if run_dir.exists():
        shutil.rmtree(run_dir)
    overrides = sweep.trial_overrides(trial)
    return [*base, "--config", sweep.config, "--run-dir", str(run_dir), *where,
            *[a for o in overrides for a in ("--set", o)]]


def _watch(child: subprocess.Popen, run_dir: Path, control, report) -> int:
    """Report the run's progress to Tune until it exits; stop it (as Ctrl-C does: checkpoint and
    summary) when the sweep stops. Returns its exit code."""
    metrics = run_dir / "metrics.jsonl"
    offset, latest, total, asked_to_stop = 0, {}, None, False
    while True:
        try:
            code = child.wait(timeout=POLL_S)
        except subprocess.TimeoutExpired:
            code = None
        if total is None:
            total = _total_steps(run_dir)
        offset, new = _read_records(metrics, offset)
        if new:
            for record in new:
                latest.update({k: v for k, v in record.items() if k in (
                    "env_steps", "wall_seconds", "learner/updates_per_s", "eval/mean_reward", "eval/success_rate")})
            report({"status": "running", "env_steps": latest.get("env_steps", 0), "total_env_steps": total or 0,
                    "wall_seconds": latest.get("wall_seconds", 0.0),
                    "updates_per_s": latest.get("learner/updates_per_s", 0.0),
                    "eval": latest.get("eval/mean_reward", float("nan"))})
        if code is not None:
            return code
        if not asked_to_stop and _stopping(control):
            child.send_signal(signal.SIGTERM)
            asked_to_stop = True


def _stopping(control) -> bool:
    import ray

    try:
        return bool(ray.get(control.is_stopping.remote(), timeout=30))
    except Exception:  # the sweep's driver is gone: stop as if it had asked
        return True


def _stop_with_parent() -> None:
    """In the child: SIGTERM (an orderly stop) when the trial's process dies, so that no run outlives
    a trial Tune killed."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _read_records(path: Path, offset: int) -> tuple[int, list[dict]]:
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            data = handle.read()
    except OSError:
        return offset, []
    complete = data[:data.rfind(b"\n") + 1]
    records = []
    for line in complete.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return offset + len(complete), records


def _total_steps(run_dir: Path) -> int | None:
    try:
        return int(yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["total_env_steps"])
    except (OSError, KeyError, TypeError, ValueError):
        return None


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _tail(path: Path, lines: int = 40) -> list[str]:
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, handle.seek(0, 2) - 16384))
            return handle.read().decode(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def _result(outcome: dict) -> dict:
    return {"env_steps": outcome.get("env_steps", 0), "total_env_steps": outcome.get("env_steps", 0),
            "eval": outcome["final_eval"], "wall_seconds": outcome.get("wall_seconds", 0.0),
            "updates_per_s": outcome.get("updates_per_s") or 0.0}
