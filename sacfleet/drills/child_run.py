"""A drill's run: `sacfleet train` in a child process with its own Ray, its output lines collected as
they come, and every process it starts found and named (`ray::<ActorClass>`, raylet, driver, ...)."""

from __future__ import annotations

import os
import queue
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


def learning(line: str) -> bool:
    """Whether a run's line is a progress record made after its first update."""
    return line.startswith("steps") and "updates         0 " not in line
