"""Leaves no process behind when a driver that started its own Ray ends, however it ends (even by
SIGKILL): a small watchdog process, started before Ray, waits for the driver's pipe to close and then
stops every process that carries the driver's run token in its environment (Ray's GCS, raylet and
workers inherit it) or that it saw under the driver while the driver lived (Ray's agents)."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

TOKEN_VAR = "SACFLEET_RUN_TOKEN"
GRACE_SECONDS = 2.0  # after SIGTERM, before SIGKILL
KILL_SECONDS = 30.0

_pipe: int | None = None  # the write end; the driver holds it open for its whole life


def start_reaper() -> str:
    """Start the watchdog for this process and mark everything it starts from now on; returns the
    token. Call it before starting Ray; once per process."""
    global _pipe
    if _pipe is not None:
        return os.environ[TOKEN_VAR]
    token = uuid.uuid4().hex
    read_end, _pipe = os.pipe()  # not inherited by later children: only the driver holds the write end
    subprocess.Popen([sys.executable, "-m", "sacfleet.common.reaper", token, str(os.getpid())], stdin=read_end,
                     stdout=subprocess.DEVNULL, start_new_session=True)  # a terminal's Ctrl-C does not reach it
    os.close(read_end)
    os.environ[TOKEN_VAR] = token
    return token


def marked_processes(token: str, exclude: set[int]) -> list[int]:
    """Pids of live processes whose environment holds TOKEN_VAR=token."""
    marker = f"{TOKEN_VAR}={token}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in exclude:
            continue
        try:
            if marker in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:  # gone, or another user's
            continue
    return found


def reap(token: str, exclude: set[int]) -> int:
    """SIGTERM every marked process, then SIGKILL whatever is marked (including processes started
    meanwhile, e.g. an agent a dying raylet respawned) until none is left or KILL_SECONDS pass;
    returns how many are left."""
    _signal(marked_processes(token, exclude), signal.SIGTERM)
    deadline = time.monotonic() + GRACE_SECONDS
    while (pids := marked_processes(token, exclude)) and time.monotonic() < deadline:
        time.sleep(0.1)
    deadline = time.monotonic() + KILL_SECONDS
    while pids and time.monotonic() < deadline:
        _signal(pids, signal.SIGKILL)
        time.sleep(0.2)
        pids = marked_processes(token, exclude)
    return len(pids)


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def children_by_parent() -> dict[int, list[int]]:
    """{parent pid: [child pids]} of every live process."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(proc.name))
    return children


def descendants(root: int) -> dict[int, str]:
    """{pid: start time} of every live descendant of `root`."""
    children = children_by_parent()
    found, stack = {}, list(children.get(root, []))
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        started = _start_time(pid)
        if started is not None:
            found[pid] = started
    return found


def main(argv: list[str]) -> int:
    token, driver = argv[0], int(argv[1])
    # Ray starts some processes (its agents) with an environment of its own, without the token:
    # every process under the driver is also remembered while the driver lives, and stopped too.
    seen: dict[int, str] = {}
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], 1.0)
        if ready and not os.read(sys.stdin.fileno(), 4096):  # EOF: the driver exited, crashed or was killed
            break
        if not ready:
            seen.update(descendants(driver))
    left = [pid for pid, started in seen.items() if _start_time(pid) == started and pid != os.getpid()]
    _signal(left, signal.SIGTERM)
    reap(token, {os.getpid(), driver})
    _signal([pid for pid in left if _start_time(pid) == seen[pid]], signal.SIGKILL)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(main(sys.argv[1:]))
