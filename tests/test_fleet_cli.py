"""`sacfleet train` as users run it, in a child process with its own embedded Ray: an end-to-end
learning run, Ctrl-C then --resume, and no Ray process left behind."""

import ipaddress
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from sacfleet.drills.child_run import process_kind
from sacfleet.driver.checkpoint_files import load_checkpoint


def processes_of(marker: str) -> list[str]:
    """Live processes whose environment holds `marker` (every Ray process inherits RAY_TMPDIR)."""
    return [cmdline for _, cmdline in pids_of(marker)]


def pids_of(marker: str, title: str = "") -> list[tuple[int, str]]:
    """(pid, command line) of live processes whose environment holds `marker` and whose kind is `title`
    (`ray::<ActorClass>` for an actor, whatever method or name its process title shows; see `drills.process_kind`)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker.encode() in (proc / "environ").read_bytes():
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if not title or process_kind(cmdline.split()) == title:
                    found.append((int(proc.name), cmdline))
        except OSError:  # gone, or not ours
            continue
    return found


def listening_addresses(pids: list[int]) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state that one of `pids` holds open."""
    listening = {}  # socket inode -> (address, port)
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            address, port = fields[1].split(":")
            raw = bytes.fromhex(address)  # the kernel prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            listening[int(fields[9])] = (socket.inet_ntop(family, raw), int(port, 16))
    found = []
    for pid in pids:
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:  # gone
            continue
        found += [listening[int(link[8:-1])] for link in links
                  if link.startswith("socket:[") and int(link[8:-1]) in listening]
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback  # an IPv6 socket may carry an IPv4 one


class Lines:
    """A child's output lines as they come, read on a thread so that a test can wait for one."""

    def __init__(self, proc):
        self.seen: list[str] = []
        self.queue: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [self.queue.put(line) for line in proc.stdout], daemon=True).start()

    def wait_for(self, predicate, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.queue.get(timeout=0.5)
            except queue.Empty:
                continue
            self.seen.append(line)
            if predicate(line):
                return line
        raise AssertionError(f"no such line within {timeout:g} s; output so far:\n{''.join(self.seen)}")

    def rest(self) -> str:
        while True:
            try:
                self.seen.append(self.queue.get(timeout=5))
            except queue.Empty:
                return "".join(self.seen)


@pytest.fixture
def ray_tmp():
    # Short: Ray's unix socket paths must stay under about 100 characters.
    path = tempfile.mkdtemp(prefix="sfr", dir="/tmp")
    yield path
    subprocess.run(["rm", "-rf", path], check=False)


def sacfleet(*args, ray_tmp: str, **kwargs):
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "sacfleet", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def no_ray_left(ray_tmp: str, timeout: float = 20.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := processes_of(f"RAY_TMPDIR={ray_tmp}")) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def test_end_to_end_fleet_learns_the_point_mass(tmp_path, ray_tmp):
    run_dir = tmp_path / "run"
    proc = sacfleet("train", "--config", "pointmass", "--set", "actors.num=2", "--set", "replay.num_shards=2",
                    "--num-cpus", "2", "--run-dir", str(run_dir), ray_tmp=ray_tmp)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["mode"] == "fleet" and summary["env_steps"] >= 12_000
    assert summary["eval"]["return_mean"] >= -100, output  # issue 3 asks -450; `make run` must reach -100
    assert summary["replay"]["samples_per_insert"] == pytest.approx(256, rel=0.1)
    assert summary["actors"] == {"num": 2, "initial": 2, "envs_per_actor": 1, "restarts": 0, "hung": 0,
                                 "scaling": []}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    names = set().union(*records)
    assert {"rollout/ep_rew_mean", "rollout/ep_len_mean", "eval/mean_reward", "train/actor_loss",
            "train/critic_loss", "train/ent_coef", "train/ent_coef_loss", "train/n_updates", "time/fps",
            "replay/size", "replay/inserts_per_s", "replay/samples_per_s", "learner/updates_per_s",
            "learner/policy_lag", "actors/env_steps_per_s", "actors/restarts"} <= names
    for png in ("eval_return.png", "throughput.png"):
        assert (run_dir / png).read_bytes()[:4] == b"\x89PNG"
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert "steps/s" in output and "done (train.total_env_steps reached)" in output
    # A healthy run: every check ran and none warned.
    assert summary["health"]["status"] == "ok" and summary["health"]["warnings"] == [], summary["health"]
    assert {"health/q_blowup", "health/policy_lag", "health/actors_starved", "health/learner_starved",
            "health/warnings"} <= names
    assert "health ok" in output
    assert no_ray_left(ray_tmp) == []


def scale(run_dir, actors: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sacfleet", "scale", str(run_dir), "--actors", str(actors),
                           "--timeout", "120"], capture_output=True, text=True, timeout=180)


def test_scale_a_live_run_from_one_to_two_to_one_actors_with_the_replay_ratio_held(tmp_path, ray_tmp):
    run_dir = tmp_path / "run"
    proc = sacfleet("train", "--config", "pointmass", "--set", "learner.hidden_sizes=[32, 32]",
                    "--set", "learner.batch_size=64", "--set", "replay.samples_per_insert=64",
                    "--set", "train.log_interval=1000", "--set", "eval.interval=0", "--set", "eval.final_episodes=2",
                    "--set", "train.learning_starts=500", "--set", "train.total_env_steps=1000000",
                    "--set", "actors.num=1", "--set", "actors.max_num=2", "--num-cpus", "2",
                    "--run-dir", str(run_dir), ray_tmp=ray_tmp)
    lines = Lines(proc)
    marker = f"RAY_TMPDIR={ray_tmp}"
    try:
        lines.wait_for(lambda line: line.startswith("steps") and "updates         0 " not in line, 180)
        assert len(pids_of(marker, "ray::EnvActor")) == 1
        refused = scale(run_dir, 3)  # the CPU shares were planned for actors.max_num=2
        assert refused.returncode == 1 and "do not fit" in refused.stderr and "actors.max_num" in refused.stderr
        up = scale(run_dir, 2)
        assert up.returncode == 0 and "env actors 1 -> 2" in up.stdout, up.stdout + up.stderr
        for _ in range(3):
            lines.wait_for(lambda line: line.startswith("steps") and "| actors 2 |" in line, 120)
        assert len(pids_of(marker, "ray::EnvActor")) == 2
        down = scale(run_dir, 1)
        assert down.returncode == 0 and "env actors 2 -> 1" in down.stdout, down.stdout + down.stderr
        for _ in range(3):
            lines.wait_for(lambda line: line.startswith("steps") and "actors 2" not in line, 120)
        # The retired actor's process is gone (Ray reuses no actor process).
        assert len(pids_of(marker, "ray::EnvActor")) == 1
        proc.send_signal(signal.SIGTERM)  # a graceful stop
        output = lines.rest()
        assert proc.wait(timeout=120) == 0, output
    finally:
        if proc.poll() is None:
            proc.kill()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [(c["from"], c["to"]) for c in summary["actors"]["scaling"]] == [(1, 2), (2, 1)]
    assert summary["actors"]["num"] == 1 and summary["actors"]["initial"] == 1
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    actors = [r["fleet/actors"] for r in records if "fleet/actors" in r]
    assert actors[0] == 1 and 2 in actors and actors[-1] == 1
    # Samples per insert since each previous record, with two actors and after going back to one: where
    # the config puts it.
    ratios = [(r["fleet/actors"], r["replay/samples_per_insert_recent"]) for r in records
              if "replay/samples_per_insert_recent" in r]
    phases = [n for n, _ in ratios]
    assert 2 in phases and 1 in phases[phases.index(2):], ratios
    assert all(abs(r / 64 - 1) <= 0.1 for _, r in ratios), ratios
    ended = scale(run_dir, 2)
    assert ended.returncode == 1 and "no fleet run is live" in ended.stderr
    assert no_ray_left(ray_tmp) == []


def test_ctrl_c_then_resume_continues_the_run(tmp_path, ray_tmp):
    run_dir = tmp_path / "run"
    common = ["--set", "learner.hidden_sizes=[32, 32]", "--set", "learner.batch_size=64",
              "--set", "replay.samples_per_insert=64", "--set", "train.log_interval=500",
              "--set", "eval.interval=0", "--set", "eval.final_episodes=2", "--set", "checkpoint.replay=true",
              "--set", "train.learning_starts=500"]
    proc = sacfleet("train", "--config", "pointmass", "--set", "train.total_env_steps=100000", *common,
                    "--num-cpus", "2", "--run-dir", str(run_dir), ray_tmp=ray_tmp, start_new_session=True)
    lines = []
    for line in proc.stdout:  # wait until it is learning, then press Ctrl-C
        lines.append(line)
        if line.startswith("steps") and "updates" in line and "updates         0" not in line:
            break
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C does: the whole process group
    rest, _ = proc.communicate(timeout=300)
    output = "".join(lines) + rest
    assert proc.returncode == 0, output
    first = json.loads((run_dir / "summary.json").read_text())
    assert first["interrupted"] and first["stop_reason"] == "interrupted"
    assert 0 < first["env_steps"] < 100_000 and first["updates"] > 0
    assert no_ray_left(ray_tmp) == []

    target = first["env_steps"] + 1000
    config_before = (run_dir / "config.yaml").read_text()
    proc = sacfleet("train", "--resume", str(run_dir), "--set", f"train.total_env_steps={target}",
                    "--set", "learner.obs_clip=5", "--num-cpus", "2", ray_tmp=ray_tmp)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    assert f"resuming at {first['env_steps']:,} env steps, {first['updates']:,} updates, replay restored" in output
    [applies] = [line for line in output.splitlines() if line.startswith("resume applies: ")]
    assert "learner.obs_clip None -> 5.0" in applies and f"train.total_env_steps 100000 -> {target}" in applies
    # obs_clip lives in the networks' buffers: the resumed networks clip at 5, as config.yaml now says.
    learner = load_checkpoint(run_dir)["learner"]
    for net in ("actor", "critic", "target_critic"):
        assert learner[net]["obs_clip"].item() == 5.0, net
    assert "obs_clip: null" in config_before and "obs_clip: 5.0" in (run_dir / "config.yaml").read_text()
    second = json.loads((run_dir / "summary.json").read_text())
    assert second["replay"]["restored_size"] == first["replay"]["size"]
    assert second["env_steps"] >= target
    assert second["updates"] > first["updates"]
    # With the replay restored there is no second warm-up: updates continue at the configured ratio.
    assert second["updates"] - first["updates"] >= 0.8 * (second["env_steps"] - first["env_steps"])
    assert second["wall_seconds"] > first["wall_seconds"]
    steps = [json.loads(line)["env_steps"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "time/fps" in line]
    assert steps == sorted(steps) and steps[-1] >= target
    assert no_ray_left(ray_tmp) == []


def test_an_embedded_run_listens_on_loopback_only_and_sigkill_of_its_driver_leaves_no_process_behind(
        tmp_path, ray_tmp):
    proc = sacfleet("train", "--config", "pointmass", "--set", "train.total_env_steps=100000",
                    "--set", "learner.hidden_sizes=[32, 32]", "--set", "train.log_interval=500",
                    "--num-cpus", "2", "--run-dir", str(tmp_path / "run"), ray_tmp=ray_tmp)
    lines = Lines(proc)
    lines.wait_for(lambda line: line.startswith("steps") and "updates         0 " not in line, timeout=180)
    processes = pids_of(f"RAY_TMPDIR={ray_tmp}")
    kinds = {process_kind(cmdline.split()) for _, cmdline in processes}
    assert {"ray::LearnerService", "ray::ReplayShard", "ray::EnvActor", "raylet", "gcs_server"} <= kinds, kinds
    # The driver, the GCS, the raylet and every actor serve gRPC: all of it on 127.0.0.1.
    listening = listening_addresses([proc.pid] + [pid for pid, _ in processes])
    assert len(listening) >= 5 and not [a for a in listening if not is_loopback(a[0])], listening
    os.kill(proc.pid, signal.SIGKILL)  # the driver alone, as the OOM killer or `kill -9` would
    proc.wait(timeout=10)
    assert no_ray_left(ray_tmp, timeout=10) == []


def test_sigterm_to_the_driver_stops_the_run_gracefully_and_reachable_opens_the_network(tmp_path, ray_tmp):
    # Ray's core worker installs its own SIGTERM handler (log and exit 15); the CLI's must win.
    proc = sacfleet("train", "--config", "pointmass", "--set", "train.total_env_steps=100000",
                    "--set", "learner.hidden_sizes=[32, 32]", "--set", "train.log_interval=500",
                    "--set", "eval.final_episodes=2", "--num-cpus", "2", "--run-dir", str(tmp_path / "run"),
                    "--reachable", ray_tmp=ray_tmp)
    lines = Lines(proc)
    lines.wait_for(lambda line: line.startswith("steps") and "updates         0 " not in line, timeout=180)
    listening = listening_addresses([proc.pid] + [pid for pid, _ in pids_of(f"RAY_TMPDIR={ray_tmp}")])
    assert [a for a in listening if not is_loopback(a[0])], listening  # Ray's own default: the network
    proc.send_signal(signal.SIGTERM)  # as a scheduler stops a job
    assert proc.wait(timeout=300) == 0, lines.rest()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["interrupted"] and load_checkpoint(tmp_path / "run")["learner"]["updates"] == summary["updates"]
    assert no_ray_left(ray_tmp) == []


def test_resume_refuses_a_finished_run_and_a_missing_one(tmp_path, ray_tmp):
    proc = sacfleet("train", "--resume", str(tmp_path / "nothing"), ray_tmp=ray_tmp)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "no config.yaml there" in output


def test_a_replay_too_big_for_the_machine_is_refused_before_ray_starts(tmp_path, ray_tmp):
    proc = sacfleet("train", "--config", "pointmass", "--set", "replay.capacity=100000000000",
                    "--run-dir", str(tmp_path / "run"), ray_tmp=ray_tmp)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "replay.capacity=100,000,000,000 needs" in output, output
    assert "Started a local Ray instance" not in output and not list(Path(ray_tmp).iterdir())


def test_health_warns_of_a_stuck_learner_and_of_stuck_actors_as_it_happens(tmp_path, ray_tmp):
    """SIGSTOP the learner, then the env actors, as a hung process would: the driver keeps watching
    and names each stall within health.starved_seconds; after SIGCONT the run finishes."""
    run_dir = tmp_path / "run"
    proc = sacfleet("train", "--config", "pointmass", "--set", "health.starved_seconds=3",
                    "--set", "train.total_env_steps=4000", "--set", "eval.interval=0", "--set", "eval.final_episodes=2",
                    "--num-cpus", "2", "--run-dir", str(run_dir), ray_tmp=ray_tmp, start_new_session=True)
    lines = Lines(proc)
    try:
        lines.wait_for(lambda line: re.match(r"steps .* updates +[1-9]", line) is not None, timeout=120)
        [(learner, _)] = pids_of(f"RAY_TMPDIR={ray_tmp}", "ray::LearnerService")
        os.kill(learner, signal.SIGSTOP)
        try:
            warning = lines.wait_for(lambda line: "health warning (actors_starved)" in line, timeout=60)
        finally:
            os.kill(learner, signal.SIGCONT)
        assert "held back by the rate limiter" in warning and "the learner is not sampling" in warning
        actors = [pid for pid, _ in pids_of(f"RAY_TMPDIR={ray_tmp}", "ray::EnvActor")]
        assert len(actors) == 2
        for pid in actors:
            os.kill(pid, signal.SIGSTOP)
        try:
            warning = lines.wait_for(lambda line: "health warning (learner_starved)" in line, timeout=60)
        finally:
            for pid in actors:
                os.kill(pid, signal.SIGCONT)
        assert "waited" in warning and "actors are failing, stuck or too slow" in warning
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = lines.rest()
    assert proc.returncode == 0, output
    summary = json.loads((run_dir / "summary.json").read_text())
    warned = {w["check"]: w for w in summary["health"]["warnings"]}
    assert {"actors_starved", "learner_starved"} <= set(warned), summary["health"]
    assert not warned["actors_starved"]["active_at_end"] and not warned["learner_starved"]["active_at_end"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("health/actors_starved", 0) for r in records) >= 3
    assert "health warnings (" in output and no_ray_left(ray_tmp) == []
