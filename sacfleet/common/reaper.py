"""Leaves no process behind when a driver that started its own Ray ends, however it ends (even by
SIGKILL): a small watchdog process, started before Ray, waits for the driver's pipe to close and then
stops every process that carries the driver's run token in its environment (Ray's GCS, raylet,
dashboard and runtime-env agents and workers all inherit it)."""

from __future__ import annotations

import os
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


def main(argv: list[str]) -> int:
    token, driver = argv[0], int(argv[1])
    try:
        while sys.stdin.buffer.read(4096):  # EOF: the driver has exited, crashed or been killed
            pass
    except OSError:
        pass
    reap(token, {os.getpid(), driver})
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(main(sys.argv[1:]))
