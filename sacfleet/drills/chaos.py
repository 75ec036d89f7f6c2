"""`sacfleet chaos`: a run during which a random fleet process is SIGKILLed (or, with --hang, stopped with
SIGSTOP as a hung process would be) every N seconds, each once the run has reported the previous
failure; checks that the run finishes, counts every failure (the hung ones as hung) and leaves no
stopped process behind."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path
from typing import Callable

from sacfleet.drills.child_run import ChildRun, learning

# Victims are processes up this long: a run reports a hung eval actor as it kills it, and a process
# stopped while Ray still restarts it never serves (the run then stops, after 120 s, as documented).
MIN_AGE_S = 20.0
# A killed process goes at once; a hung one that is reported as it is killed (the eval actor) a moment later.
GONE_WITHIN_S = 30.0
# Fleet processes chaos kills, by Ray's process title, and the line the run prints for each failure.
TARGETS = {"EnvActor": "env actor", "ReplayShard": "replay shard", "LearnerService": "learner",
           "EvalActor": "eval actor"}


def chaos(train_args: list[str], run_dir: Path, every: float, targets: list[str], seed: int,
          echo: Callable[[str], None], hang: float = 0.0) -> dict:
    """Kill one random fleet process (of `targets`, Ray class names) every `every` seconds once the
    run learns, each only after the run has reported the previous failure; a fraction `hang` of the
    victims are SIGSTOPped instead (the run must find the process silent, kill it and recover). Returns the
    report, also written to run_dir/chaos.json. Counters are exact when the run's failure counts equal
    the signals sent, its hung counts equal the stops, and no stopped process is left."""
    rng = random.Random(seed)
    child = ChildRun([*train_args, "--run-dir", str(run_dir), "--set", "train.max_failures=1000",
                      "--set", "actors.max_restarts=1000"], echo)
    kills: list[dict] = []
    start = time.monotonic()
    try:
        if child.wait_for(learning, timeout=600) is None:
            raise RuntimeError("chaos: the run did not start learning within 600 s")
        while child.running():
            time.sleep(every)
            if any(line.startswith("stopping (") for line in child.lines):
                break
            candidates = [p for p in child.processes() if p.kind.removeprefix("ray::") in targets
                          and _age_s(p.pid) >= MIN_AGE_S]
            if not candidates:
                continue
            victim = rng.choice(candidates)
            kind = victim.kind.removeprefix("ray::")
            how = signal.SIGSTOP if rng.random() < hang else signal.SIGKILL
            t0, seen = time.monotonic(), len(child.lines)
            try:
                os.kill(victim.pid, how)
            except ProcessLookupError:
                continue
            what = TARGETS[kind]
            echo(f"chaos: {how.name} {victim.kind} pid {victim.pid} at {t0 - start:.0f}s")
            # Wait until the run says it has it back (env actors: the restart line; others: recovered).
            said = child.wait_for(lambda line: line.startswith(what) and (
                "restarting it" in line or "recovered in" in line or "runs again" in line
                or "nothing was lost" in line or "not restarted" in line), timeout=300)
            said_at = time.monotonic()
            back = child.wait_for(learning, timeout=300) if said else None
            kills.append({"process": kind, "pid": victim.pid, "signal": how.name, "at_s": round(t0 - start, 1),
                          "reported": said is not None,
                          "hung_reported": any(line.startswith(what) and " hung (" in line
                                               for line in child.lines[seen:]),
                          "seconds_to_reported_back": round(said_at - t0, 1) if said else None,
                          "seconds_to_learning_again": round(time.monotonic() - t0, 1) if back else None,
                          "gone": _gone(victim.pid, within=GONE_WITHIN_S)})
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
        stopped = sum(k["signal"] == "SIGSTOP" for k in kills)
        counted_hung = summary["recovery"].get("hung", 0) + summary["actors"].get("hung", 0)
        left = [k["pid"] for k in kills if not k["gone"]]
        report.update({"killed": killed, "counted": counted, "stopped": stopped, "counted_hung": counted_hung,
                       "left_behind": left, "exact": killed == counted and stopped == counted_hung and not left,
                       "eval_return": summary["eval"]["return_mean"], "env_steps": summary["env_steps"],
                       "lost_transitions": summary["recovery"]["lost_transitions"],
                       "lost_updates": summary["recovery"]["lost_updates"]})
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / "chaos.json").write_text(json.dumps(report, indent=2))
    return report


def _age_s(pid: int) -> float:
    """Seconds since the process started (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            started = int(handle.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        with open("/proc/uptime") as handle:
            return float(handle.read().split()[0]) - started
    except (OSError, ValueError, IndexError):
        return 0.0


def _gone(pid: int, within: float = 0.0) -> bool:
    """The process has exited, or does so `within` seconds (a zombie waiting for its parent counts as
    gone: it holds nothing)."""
    deadline = time.monotonic() + within
    while True:
        try:
            with open(f"/proc/{pid}/stat") as handle:
                if handle.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return True
        except OSError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
