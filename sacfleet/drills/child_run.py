"""Failure and endurance drills on a real run (`sacfleet chaos`, `sacfleet soak`): `sacfleet train` in
a child process with its own Ray; chaos SIGKILLs a random fleet process every N seconds and checks
that the run finishes with exact failure counts; soak samples the memory of every process of the
run and reports which grew after the warm-up."""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

DRILL_VAR = "SACFLEET_DRILL"
# Fleet processes chaos kills, by Ray's process title, and the line the run prints for each failure.
TARGETS = {"EnvActor": "env actor", "ReplayShard": "replay shard", "LearnerService": "learner",
           "EvalActor": "eval actor"}


@dataclass
class Proc:
    pid: int
    kind: str  # "ray::EnvActor", "raylet", "driver", ...


def actor_title(title: str) -> str:
    """`ray::<Class>` for a Ray worker's process title, which may also be `ray::<name>:<Class>.<method>`
    (a named actor, while it runs a method) or `ray::IDLE`."""
    bare = title.split()[0].removeprefix("ray::")
    return "ray::" + bare.rsplit(":", 1)[-1].split(".")[0]


def process_kind(cmdline: list[str]) -> str:
    """What a process of a run is, from its command line: `ray::<Class>`, raylet, driver, ..."""
    if not cmdline:
        return "?"
    head = cmdline[0]
    if head.startswith("ray::"):
        return actor_title(head)
    text = " ".join(cmdline)
    for key, name in (("raylet", "raylet"), ("gcs_server", "gcs_server"), ("sacfleet.common.reaper", "reaper"),
                      ("-m sacfleet", "driver"), ("dashboard/agent", "dashboard agent"),
                      ("runtime_env/agent", "runtime-env agent"), ("log_monitor", "log monitor"),
                      ("dashboard.py", "dashboard"), ("monitor.py", "autoscaler monitor")):
        if key in text:
            return name
    return Path(head).name


class ChildRun:
    """`sacfleet train ARGS` in a child process in its own session; its output lines are collected
    as they come (and echoed), and every process it starts is found by a marker in its environment."""

    def __init__(self, train_args: list[str], echo: Callable[[str], None]):
        self.marker = f"{DRILL_VAR}={uuid.uuid4().hex}".encode()
        env = {**os.environ, DRILL_VAR: self.marker.decode().split("=", 1)[1], "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "sacfleet", "train", *train_args], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self.new: queue.Queue = queue.Queue()
        self.echo = echo
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            self.new.put(line)
            self.echo(line)

    def running(self) -> bool:
        return self.proc.poll() is None

    def processes(self) -> list[Proc]:
        found = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                if self.marker in (proc / "environ").read_bytes().split(b"\0"):
                    cmdline = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
                    found.append(Proc(int(proc.name), process_kind([c for c in cmdline if c])))
            except OSError:
                continue
        return found

    def wait_for(self, predicate: Callable[[str], bool], timeout: float) -> str | None:
        """The first new line that satisfies `predicate`, or None on timeout or the run's end."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.new.get(timeout=0.5)
            except queue.Empty:
                if not self.running() and self.new.empty():
                    return None
                continue
            if predicate(line):
                return line
        return None

    def stop(self, interrupt: bool = False) -> int:
        """Wait for the run's end (stop it now with `interrupt`, else after 10 minutes more); its
        exit code. The run then checkpoints and writes its summary, as after a Ctrl-C."""
        try:
            if not interrupt:
                return self.proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            pass
        # SIGTERM stops `sacfleet train` as Ctrl-C does; SIGINT may be ignored in a background job.
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=300)


def _learning(line: str) -> bool:
    return line.startswith("steps") and "updates         0 " not in line


# ------------------------------------------------------------------------------------------ chaos

def chaos(train_args: list[str], run_dir: Path, every: float, targets: list[str], seed: int,
          echo: Callable[[str], None]) -> dict:
    """Kill one random fleet process (of `targets`, Ray class names) every `every` seconds once the
    run learns, each only after the run has reported the previous failure; returns the report, also
    written to run_dir/chaos.json. Counters are exact when the run's failure counts equal the kills."""
    rng = random.Random(seed)
    child = ChildRun([*train_args, "--run-dir", str(run_dir), "--set", "train.max_failures=1000",
                      "--set", "actors.max_restarts=1000"], echo)
    kills: list[dict] = []
    start = time.monotonic()
    try:
        if child.wait_for(_learning, timeout=600) is None:
            raise RuntimeError("chaos: the run did not start learning within 600 s")
        while child.running():
            time.sleep(every)
            if any(line.startswith("stopping (") for line in child.lines):
                break
            candidates = [p for p in child.processes() if p.kind.removeprefix("ray::") in targets]
            if not candidates:
                continue
            victim = rng.choice(candidates)
            kind = victim.kind.removeprefix("ray::")
            t0 = time.monotonic()
            try:
                os.kill(victim.pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            what = TARGETS[kind]
            echo(f"chaos: SIGKILL {victim.kind} pid {victim.pid} at {t0 - start:.0f}s")
            # Wait until the run says it has it back (env actors: the restart line; others: recovered).
            said = child.wait_for(lambda line: line.startswith(what) and (
                "restarting it" in line or "recovered in" in line or "runs again" in line
                or "nothing was lost" in line or "not restarted" in line), timeout=300)
            back = child.wait_for(_learning, timeout=300) if said else None
            kills.append({"process": kind, "pid": victim.pid, "at_s": round(t0 - start, 1),
                          "reported": said is not None,
                          "seconds_to_learning_again": round(time.monotonic() - t0, 1) if back else None})
    except BaseException:  # Ctrl-C of the drill stops the run too
        child.stop(interrupt=True)
        raise
    code = child.stop()
    summary_path = Path(run_dir) / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    report = {"exit_code": code, "finished": code == 0 and summary is not None, "kills": kills,
              "every_s": every, "seed": seed}
    if summary:
        killed = {kind: sum(k["process"] == kind for k in kills) for kind in TARGETS}
        events = summary["recovery"]["events"]
        counted = {"EnvActor": summary["actors"]["restarts"],
                   **{kind: sum(e["component"].startswith(TARGETS[kind]) for e in events)
                      for kind in ("ReplayShard", "LearnerService", "EvalActor")}}
        report.update({"killed": killed, "counted": counted, "exact": killed == counted,
                       "eval_return": summary["eval"]["return_mean"], "env_steps": summary["env_steps"],
                       "lost_transitions": summary["recovery"]["lost_transitions"],
                       "lost_updates": summary["recovery"]["lost_updates"]})
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / "chaos.json").write_text(json.dumps(report, indent=2))
    return report


# ------------------------------------------------------------------------------------------- soak

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
