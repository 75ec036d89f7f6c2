"""Changes the number of env actors of a live fleet run: `sacfleet scale RUN_DIR --actors N` writes a
request into the run directory, the driver carries it out between polls (new actors placed on the
nodes with room, retired ones stopped after their last chunk) and writes its answer back.

The replay ratio needs nothing here: each shard's rate limiter holds samples per insert where the
config puts it, whatever the number of actors feeding it."""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path

import ray
from ray.exceptions import GetTimeoutError

from sacfleet.common.io import atomic_write_bytes
from sacfleet.driver.calls import CALL_ERRORS
from sacfleet.driver.errors import ray_cause
from sacfleet.driver.placement import node_label

REQUEST = "scale.request.json"
REPLY = "scale.reply.json"
DRIVER = "driver.json"  # the live driver's pid and host, while a fleet session runs
START_TIMEOUT = 120.0  # a new actor not running by then is given up: Ray could not place it
STOP_TIMEOUT = 60.0  # a retired actor's last chunk and statistics


class ScaleRefused(ValueError):
    """The driver did not change the actor count; the message says why."""


# ---------------------------------------------------------------------------------- the command side

def request_scale(run_dir: Path, actors: int, timeout: float = 180.0, poll: float = 0.2) -> dict:
    """Ask the driver of the live run in `run_dir` for `actors` env actors; returns its answer
    ({"ok", "message", "from", "to"}). Raises ScaleRefused when the run is not live or refuses."""
    run_dir = Path(run_dir)
    if actors < 1:
        raise ScaleRefused(f"--actors must be >= 1, got {actors}")
    if not (run_dir / "config.yaml").exists():
        raise ScaleRefused(f"{run_dir} is not a run directory (no config.yaml)")
    if not driver_alive(run_dir):
        raise ScaleRefused(f"no fleet run is live in {run_dir} (no running `sacfleet train` driver on this host "
                           f"has it; an --inline run cannot be scaled)")
    request_id = uuid.uuid4().hex
    atomic_write_bytes(run_dir / REQUEST, json.dumps({"id": request_id, "actors": actors,
                                                      "pid": os.getpid()}).encode())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            reply = json.loads((run_dir / REPLY).read_text())
        except (OSError, ValueError):
            reply = None
        if reply and reply.get("id") == request_id:
            if not reply["ok"]:
                raise ScaleRefused(reply["message"])
            return reply
        if not driver_alive(run_dir):
            (run_dir / REQUEST).unlink(missing_ok=True)
            raise ScaleRefused(f"the run in {run_dir} stopped before it carried out the request")
        time.sleep(poll)
    (run_dir / REQUEST).unlink(missing_ok=True)
    raise ScaleRefused(f"no answer from a running `sacfleet train` in {run_dir} within {timeout:g} s; is the "
                       f"run live (a fleet run, not --inline)?")


def driver_alive(run_dir: Path) -> bool:
    try:
        driver = json.loads((Path(run_dir) / DRIVER).read_text())
    except (OSError, ValueError):
        return False
    if driver.get("host") != socket.gethostname():
        return True  # a driver elsewhere (a shared run directory): its answer will tell
    try:
        os.kill(int(driver["pid"]), 0)
    except (ProcessLookupError, ValueError, KeyError, TypeError):
        return False
    except PermissionError:
        pass
    return True


# ----------------------------------------------------------------------------------- the driver side

class Scaler:
    """Carries out scale requests for one fleet session; `changes` lists each one for the summary."""

    def __init__(self, run_dir: Path, fleet, echo, steps, wall):
        self.run_dir, self.fleet, self.echo = Path(run_dir), fleet, echo
        self.steps, self.wall = steps, wall  # callables: the run's env steps and wall seconds
        self.changes: list[dict] = []
        self.next_index = max((slot.index for slot in fleet.actors), default=-1) + 1
        # A request left from an earlier session is not for this one.
        (self.run_dir / REQUEST).unlink(missing_ok=True)
        atomic_write_bytes(self.run_dir / DRIVER, json.dumps({"pid": os.getpid(),
                                                              "host": socket.gethostname()}).encode())

    def close(self) -> None:
        (self.run_dir / DRIVER).unlink(missing_ok=True)

    @property
    def actors(self) -> int:
        return len(self.fleet.actors)

    def check(self) -> None:
        """Carry out a pending request, if any, and answer it."""
        path = self.run_dir / REQUEST
        if not path.exists():
            return
        try:
            request = json.loads(path.read_text())
            target = int(request["actors"])
            request_id = str(request["id"])
        except (OSError, ValueError, KeyError, TypeError):
            return  # being written (atomically renamed) or garbage: look again at the next poll
        path.unlink(missing_ok=True)
        before = self.actors
        try:
            message = self.scale(target)
            ok = True
        except ScaleRefused as exc:
            message, ok = str(exc), False
            self.echo(f"scale request for {target} env actors refused: {message}")
        try:
            atomic_write_bytes(self.run_dir / REPLY, json.dumps({"id": request_id, "ok": ok, "message": message,
                                                                 "from": before, "to": self.actors}).encode())
        except OSError as exc:  # a full disk: `sacfleet scale` times out, the run goes on
            self.echo(f"scale request {request_id}: the reply could not be written: {exc}")

    def scale(self, target: int) -> str:
        cfg, fleet = self.fleet.cfg, self.fleet
        if target < 1:
            raise ScaleRefused(f"a fleet needs at least 1 env actor, not {target}")
        if cfg.replay.her != "off" and target < cfg.replay.num_shards:
            raise ScaleRefused(f"with replay.her on each actor feeds its own shard: at least replay.num_shards="
                               f"{cfg.replay.num_shards} env actors are needed, not {target}")
        if fleet.actors.stopping:
            raise ScaleRefused("the run is stopping")
        before = self.actors
        if target == before:
            return f"the fleet already has {before} env actors"
        changed = self._add(target - before) if target > before else self._remove(before - target)
        change = {"env_steps": self.steps(), "wall_seconds": round(self.wall(), 2), "from": before, "to": self.actors,
                  "actors": changed}
        self.changes.append(change)
        labels = {n.id: n.label for n in fleet.placement.nodes}
        where = ", ".join(f"{part} on {labels.get(node, node_label('?', node))}" for part, node in changed.items())
        message = (f"env actors {before} -> {self.actors} at {change['env_steps']:,} env steps "
                   f"({fleet.res.actor_cpus:g} CPU each; {'started' if target > before else 'retired'} {where})")
        self.echo(f"scaled: {message}")
        return message

    def _add(self, count: int) -> dict[str, str]:
        """Start `count` actors on nodes with room; returns {"actor i": node id} of those started."""
        fleet = self.fleet
        indices = list(range(self.next_index, self.next_index + count))
        placed = []
        for i in indices:
            if fleet.placement.place(f"actor {i}", fleet.res.actor_cpus) is None:
                for j in placed:
                    fleet.placement.release(f"actor {j}", fleet.res.actor_cpus)
                raise ScaleRefused(f"{count} more env actor{'s' if count > 1 else ''} of {fleet.res.actor_cpus:g} CPU "
                                   f"{'do' if count > 1 else 'does'} not fit: CPUs free per node: "
                                   f"{fleet.placement.free_note()} (room for {len(placed)}); add nodes, or start the "
                                   f"run with actors.max_num (CPU shares are planned for that many actors) or a "
                                   f"smaller actors.num_cpus")
            placed.append(i)
        slots = fleet.actors.create(indices)
        try:
            ray.get([slot.handle.ping.remote() for slot in slots], timeout=START_TIMEOUT)
        except CALL_ERRORS as exc:
            fleet.actors.discard(slots)
            for slot in slots:
                fleet.placement.release(f"actor {slot.index}", fleet.res.actor_cpus)
            cause = "Ray did not place them" if isinstance(exc, GetTimeoutError) else ray_cause(exc)
            raise ScaleRefused(f"the new env actors did not start within {START_TIMEOUT:g} s ({cause})") from None
        self.next_index += count
        fleet.actors.launch(slots)
        return {f"actor {i}": fleet.placement.parts[f"actor {i}"] for i in indices}

    def _remove(self, count: int) -> dict[str, str]:
        """Retire the newest `count` actors: each stops after pushing what it holds, and what it did
        (restarts, stage seconds, finished episodes) stays in the run's totals."""
        fleet = self.fleet
        nodes = {}
        for slot in fleet.actors.retire(count, STOP_TIMEOUT):
            part = f"actor {slot.index}"
            nodes[part] = fleet.placement.parts.get(part, "")
            fleet.placement.release(part, fleet.res.actor_cpus)
        return nodes
