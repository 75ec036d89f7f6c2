"""`--address`: a run joins a real three-node Ray cluster started by deploy/local_cluster.sh, spreads
its parts over the nodes as planned per node, leaves the cluster running and holding none of its
actors, and the script stops only that cluster."""

import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sacfleet.common.reaper import children_by_parent
from sacfleet.drills.child_run import actor_title

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "deploy" / "local_cluster.sh"
RAY = Path(sys.executable).with_name("ray")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_ports(port: int, node: int) -> list[int]:
    """The ports local_cluster.sh gives node `node` (0 is the head), in its order: the node manager's
    is the fifth."""
    base = port + 100 + 10 * node
    return list(range(base, base + 6))


def cluster_port(workers: int) -> int:
    """A --port for a cluster of `workers` worker nodes whose ports are all free now. Drawn below the
    kernel's ephemeral range and above Ray's worker ports: a port from the ephemeral range (as
    free_port gives) has its neighbours taken at random by outgoing connections, which made a node
    fail to start once in CI."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20_000, 32_000 - 200)
        if _bindable(port) and all(_bindable(p) for node in range(workers + 1) for p in node_ports(port, node)):
            return port
    raise RuntimeError("no free block of ports in 20000-32000")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
            return True
        except OSError:
            return False


def cluster(*args, port):
    env = {**os.environ, "RAY": str(RAY)}
    return subprocess.run(["bash", str(SCRIPT), *args, "--port", str(port)], env=env, capture_output=True,
                          text=True, timeout=180)


@pytest.fixture
def local_cluster():
    port = cluster_port(workers=2)
    started = cluster("start", "--workers", "2", "--cpus-per-node", "1", port=port)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield port
    finally:
        cluster("stop", port=port)


def test_train_spreads_over_a_three_node_cluster_and_leaves_it_running(local_cluster, tmp_path):
    port = local_cluster
    address = f"127.0.0.1:{port}"
    status = cluster("status", port=port)
    assert status.returncode == 0 and status.stdout.count("node_") >= 3, status.stdout + status.stderr

    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "sacfleet", "train", "--config", "pointmass", "--address", address,
         "--run-dir", str(run_dir), "--set", "train.total_env_steps=1500", "--set", "train.learning_starts=400",
         "--set", "learner.hidden_sizes=[32, 32]", "--set", "learner.batch_size=64",
         "--set", "replay.samples_per_insert=64", "--set", "eval.interval=0", "--set", "eval.final_episodes=2",
         "--set", "replay.num_shards=2", "--set", "actors.num=3"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"(joined {address})" in proc.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["env_steps"] >= 1500 and summary["updates"] > 0
    assert summary["resources"]["cluster_cpus"] == 3.0  # head + 2 workers, one CPU each
    # Planned per node (three 1-CPU nodes): the learner fills one; the shards and the three actors
    # are spread over the other two; the placement is printed at start and kept in the summary.
    placement = {row["node"]: row["parts"] for row in summary["placement"]}
    assert len(placement) == 3 and sorted(p for parts in placement.values() for p in parts) == sorted(
        ["learner", "eval", "shard 0", "shard 1", "actor 0", "actor 1", "actor 2"]), placement
    learner_node = next(node for node, parts in placement.items() if "learner" in parts)
    assert placement[learner_node] == ["learner"]
    assert len({node for node, parts in placement.items() for p in parts if p.startswith("shard")}) == 2
    assert len({node for node, parts in placement.items() for p in parts if p.startswith("actor")}) == 2
    line = next(line for line in proc.stdout.splitlines() if line.startswith("placement: "))
    assert line.count(" CPU") == 3 and "learner" in line and "actors " in line, line

    # The cluster outlives the run, with every CPU free again: the run's actors are gone.
    probe = ("import ray, time; ray.init(address='%s'); time.sleep(2); "
             "print(ray.available_resources().get('CPU', 0), ray.cluster_resources()['CPU'])" % address)
    deadline = time.monotonic() + 30
    while True:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "RAY_AUTH_MODE": "token"})  # the script's clusters use tokens
        free, total = map(float, out.stdout.split()[-2:])
        if free == total or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert (free, total) == (3.0, 3.0), out.stdout + out.stderr


def cluster_processes(port: int) -> dict[int, str]:
    """pid -> command line of every process of the cluster on `port`: Ray's daemons (their command
    lines name its temp dir), the head's client server (it names the port), and their descendants,
    among them the dashboard and runtime-env agents, which retitle themselves."""
    roots = [pid for pid in (int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit())
             if f"/tmp/sfc-{port}/" in _cmdline(pid)
             or ("ray.util.client.server" in _cmdline(pid) and f":{port} " in _cmdline(pid) + " ")]
    tree, stack, found = children_by_parent(), roots, {}
    while stack:
        pid = stack.pop()
        if pid not in found:
            found[pid] = _cmdline(pid)
            stack.extend(tree.get(pid, []))
    return found


def test_cluster_script_stops_only_its_own_cluster(local_cluster):
    port = local_cluster
    other = cluster("status", port=free_port())
    assert other.returncode == 1 and "no local cluster" in other.stdout
    before = cluster_processes(port)
    titles = " ".join(before.values())
    assert "ray::DashboardAgent" in titles and "ray.util.client.server" in titles and "raylet" in titles, titles
    stopped = cluster("stop", port=port)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    left = {pid: cmdline for pid, cmdline in before.items() if Path(f"/proc/{pid}").exists()
            and _cmdline(pid) == cmdline}  # a reused pid is not a leftover
    assert left == {}, left
    assert cluster("status", port=port).returncode == 1


def test_cluster_script_names_a_busy_port_and_starts_nothing():
    port = cluster_port(workers=2)
    taken = node_ports(port, 2)[4]  # worker node 2's node manager
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", taken))
        holder.listen()
        started = cluster("start", "--workers", "2", port=port)
    assert started.returncode == 1, started.stdout + started.stderr
    assert f"ports in use: {taken} (node 2); nothing was started" in started.stderr, started.stderr
    assert cluster_processes(port) == {} and not Path(f"/tmp/sfc-{port}").exists()
    assert cluster("status", port=port).returncode == 1


def fleet_processes_of_node(port: int, node: int) -> list[str]:
    """Titles (ray::EnvActor, ...) of the fleet's actor processes on worker node `node` of the cluster."""
    flag = f"--node_manager_port={node_ports(port, node)[4]}"
    raylets = [pid for pid in (int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit())
               if "/raylet " in _cmdline(pid) and flag in _cmdline(pid).split()]
    assert len(raylets) == 1, f"worker node {node}'s raylet not found"
    tree, stack, titles = children_by_parent(), list(raylets), []
    while stack:
        pid = stack.pop()
        stack.extend(tree.get(pid, []))
        title = actor_title(_cmdline(pid)) if _cmdline(pid).startswith("ray::") else ""
        if title in ("ray::EnvActor", "ray::ReplayShard", "ray::LearnerService", "ray::EvalActor"):
            titles.append(title)
    return titles


def _cmdline(pid: int) -> str:
    try:
        return (Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
    except OSError:
        return ""


def test_a_lost_worker_node_is_recovered_on_the_others_and_the_run_finishes(tmp_path):
    port = cluster_port(workers=2)
    # No actors on the head; two workers of 2 CPUs, and a fleet of 1.9 CPUs that fits on either alone.
    started = cluster("start", "--workers", "2", "--cpus-per-node", "2", "--head-cpus", "0", port=port)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        run_dir = tmp_path / "run"
        proc = subprocess.Popen(
            [sys.executable, "-m", "sacfleet", "train", "--config", "pointmass", "--address", f"127.0.0.1:{port}",
             "--run-dir", str(run_dir), "--set", "train.total_env_steps=6000", "--set", "train.learning_starts=400",
             "--set", "learner.hidden_sizes=[32, 32]", "--set", "learner.batch_size=64",
             "--set", "replay.samples_per_insert=64", "--set", "eval.interval=0", "--set", "eval.final_episodes=2",
             "--set", "train.log_interval=500", "--set", "checkpoint.interval=150", "--set", "actors.num=2",
             "--set", "replay.num_shards=2", "--set", "actors.num_cpus=0.25", "--set", "replay.num_cpus=0.1",
             "--set", "learner.num_cpus=1"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        for line in proc.stdout:  # until it learns and has committed a checkpoint set
            lines.append(line)
            if (line.startswith("steps") and "updates         0 " not in line
                    and (run_dir / "checkpoints" / "checkpoint.pt").exists()):
                break
        on_node = {n: fleet_processes_of_node(port, n) for n in (1, 2)}
        node = max(on_node, key=lambda n: len(on_node[n]))
        assert on_node[node], on_node
        killed = cluster("kill-node", "--node", str(node), port=port)
        assert killed.returncode == 0, killed.stdout + killed.stderr
        rest, _ = proc.communicate(timeout=400)
        output = "".join(lines) + rest
        assert proc.returncode == 0, output
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["env_steps"] >= 6000
        # Every fleet process the node held was counted: env actors as restarts, shards, the learner
        # and the eval actor as recoveries.
        lost = on_node[node]
        events = [event["component"] for event in summary["recovery"]["events"]]
        assert summary["actors"]["restarts"] == lost.count("ray::EnvActor"), (on_node, output)
        assert sum(e.startswith("replay shard") for e in events) == lost.count("ray::ReplayShard"), (on_node, output)
        assert events.count("learner") == lost.count("ray::LearnerService"), (on_node, output)
        assert events.count("eval actor") == lost.count("ray::EvalActor"), (on_node, output)
        # One lost node is one failure against train.max_failures, however many processes it held.
        assert summary["recovery"]["failures"] == (len(events) > 0) and summary["recovery"]["recoveries"] == len(events)
    finally:
        cluster("stop", port=port)


@pytest.mark.slow
def test_a_fleet_sweep_places_each_trial_in_its_tune_reservation_on_a_two_node_cluster(tmp_path):
    port = cluster_port(workers=1)
    # Two nodes of 2 CPUs: room for two fleet trials of 2 CPUs at once, one per node.
    started = cluster("start", "--workers", "1", "--cpus-per-node", "2", "--head-cpus", "2", port=port)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        address = f"127.0.0.1:{port}"
        run_dir = tmp_path / "sweep"
        proc = subprocess.run(
            [sys.executable, "-m", "sacfleet", "sweep", "--fleet", "--seeds", "0-1", "--address", address,
             "--run-dir", str(run_dir), "--set", "train.total_env_steps=1500", "--set", "train.learning_starts=400",
             "--set", "learner.hidden_sizes=[32, 32]", "--set", "learner.batch_size=64",
             "--set", "replay.samples_per_insert=64", "--set", "eval.interval=0", "--set", "eval.final_episodes=2"],
            capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        report = json.loads((run_dir / "sweep.json").read_text())
        assert report["complete"] and report["points"][0]["finished"] == 2
        nodes = set()
        for seed in (0, 1):
            log = (run_dir / "trials" / "base" / f"s{seed}.log").read_text()
            assert f"(joined {address}) in placement group" in log and "reserved 1.9 CPUs" in log, log
            placement = next(line for line in log.splitlines() if line.startswith("placement: "))
            assert placement.count(" CPU") == 1 and "(1.9 CPU): learner, eval, shard 0, actors 0,1" in placement
            nodes.add(placement.split()[1])
        # Each part of each fleet, asked where it runs, is in its trial's placement group; one group per trial.
        groups = set()
        for seed in (0, 1):
            summary = json.loads((run_dir / "trials" / "base" / f"s{seed}" / "summary.json").read_text())
            reservation = summary["reservation"]
            assert set(reservation["parts"].values()) == {reservation["placement_group"]}, reservation
            assert len(reservation["parts"]) == 5
            groups.add(reservation["placement_group"])
        assert len(groups) == 2
        assert len(nodes) == 2  # each trial holds 2 of a node's 2 CPUs: the two ran on different nodes
    finally:
        cluster("stop", port=port)
