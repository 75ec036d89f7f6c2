"""The Ray fleet on one shared local Ray with 2 CPUs: replay ratio, supervision, shard input checks."""

import json
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from sacfleet.actors.env_actor import EnvActor
from sacfleet.common.codec import CodecError, encode_chunk
from sacfleet.common.config import load_config
from sacfleet.common.envs import describe_env
from sacfleet.common.reaper import children_by_parent
from sacfleet.common.transitions import TransitionSpec
from sacfleet.drills.child_run import actor_title
from sacfleet.driver.checkpoint_files import load_checkpoint
from sacfleet.driver.fleet import FleetParts
from sacfleet.driver.errors import RunStopped
from sacfleet.driver.train_fleet import FleetError, train_fleet
from sacfleet.driver.train_inline import seed_everything
from sacfleet.learner.sac import SACLearner
from sacfleet.learner.service import LearnerService
from sacfleet.replay_server.shard import ReplayShard, make_table
from sacfleet.replay_server.snapshot_files import read_shard

# Small networks and half an update per env step (samples_per_insert 32 < batch 64) keep runs short
# and check a ratio other than one update per step.
SHORT = ["train.total_env_steps=2500", "train.learning_starts=400", "train.log_interval=500",
         "learner.hidden_sizes=[32, 32]", "learner.batch_size=64", "replay.samples_per_insert=32",
         "learner.prefetch_batches=4", "eval.interval=0", "eval.final_episodes=2", "learner.publish_interval=5",
         "learner.critic_warmup=40"]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def run(tmp_path, *overrides, **kwargs):
    cfg = load_config("pointmass", [*SHORT, *overrides])
    return train_fleet(cfg, tmp_path / "run", echo=lambda line: None, **kwargs)


def failing_learner(at_update: int) -> FleetParts:
    """Fleet parts whose learner's update thread raises once it has made `at_update` updates. Built in
    a function: Ray pickles such classes by value, since its workers cannot import a test module."""

    class InjectedFault(RuntimeError):
        pass

    class FailingLearner(LearnerService):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            learner, update_block = self.learner, self.learner.update_block

            def failing(block):
                td_error = update_block(block)
                if learner.updates >= at_update:
                    raise InjectedFault(f"injected fault in the learner at update {at_update}")
                return td_error

            learner.update_block = failing

    return FleetParts(learner=FailingLearner)


def slow_first_block_learner(seconds: float) -> FleetParts:
    """Fleet parts whose learner's first block of updates takes `seconds` longer, holding the update
    lock as a first torch.compile or CUDA graph capture does."""

    class SlowStartLearner(LearnerService):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            update_block, slept = self.learner.update_block, []

            def slow_first(block):
                if not slept:
                    slept.append(True)
                    time.sleep(seconds)
                return update_block(block)

            self.learner.update_block = slow_first

    return FleetParts(learner=SlowStartLearner)


def failing_env_actor(actor: int, at_step: int) -> FleetParts:
    """Fleet parts whose env actor `actor` raises at its vector step `at_step`, in its first process only
    (a restarted one gets another env-seed stream)."""

    class InjectedFault(RuntimeError):
        pass

    class FailingEnvActor(EnvActor):
        def rollout(self, stream):
            rollout = super().rollout(stream)
            if (self.actor_index, stream) == (actor, actor):
                step = rollout.step

                def failing(random_actions):
                    if rollout.steps == at_step:
                        raise InjectedFault(f"injected fault in env actor {actor} at step {at_step}")
                    return step(random_actions)

                rollout.step = failing
            return rollout

    return FleetParts(env_actor=FailingEnvActor)


def wait_for_released_resources(timeout=30.0):
    """Every actor of a run is gone once the cluster's resources are all available again."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0) >= ray.cluster_resources()["CPU"] - 1e-6:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("actors", [1, 3])
def test_replay_ratio_held_within_10_percent(tmp_path, actors):
    summary = run(tmp_path, f"actors.num={actors}", "replay.num_shards=2", "eval.interval=1250", "eval.episodes=2")
    assert summary["env_steps"] >= 2500
    assert summary["actors"]["num"] == actors and summary["actors"]["restarts"] == 0
    assert summary["replay"]["samples_per_insert"] == pytest.approx(32, rel=0.10)
    # Updates follow from the ratio: (env steps - warm-up) * 32 / 64, within the same tolerance.
    expected = (summary["env_steps"] - 400) * 32 / 64
    assert summary["updates"] == pytest.approx(expected, rel=0.10)
    assert summary["policy_lag"]["mean"] is not None and summary["policy_lag"]["mean"] >= 0
    assert summary["learner_matmul_precision"] == "float32"
    # Actors pulled weights, each pull one encoded policy of the size published.
    assert summary["throughput"]["weight_pulls_per_s"] > 0
    assert 4 * 32 * 32 < summary["throughput"]["weight_bytes_per_pull"] < 100_000  # the 32x32 layer alone: 4 KB
    # One periodic evaluation, then the final one; none doubles it at the last step.
    steps = [point[0] for point in summary["eval"]["curve"]]
    assert len(steps) == 2 and 1250 <= steps[0] < 2500 and steps[1] == summary["env_steps"], steps
    assert wait_for_released_resources()


def test_goal_env_fleet_keeps_episodes_in_one_shard_and_relabels_there(tmp_path):
    cfg = load_config(None, [*SHORT, "env.id=sacfleet/PointMassGoal-v0", "actors.num=2", "replay.num_shards=2",
                             "replay.her=future", "replay.her_k=4", "checkpoint.replay=true",
                             "learner.matmul_precision=tf32"])
    summary = train_fleet(cfg, tmp_path / "run", echo=lambda line: None)
    assert summary["env_steps"] >= 2500 and summary["actors"]["restarts"] == 0
    assert summary["learner_matmul_precision"] == "tf32"  # set in the learner's process (no effect on CPU)
    assert 0.0 <= summary["eval"]["success_rate"] <= 1.0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    fractions = [r["replay/her_relabeled_fraction"] for r in records if "replay/her_relabeled_fraction" in r]
    assert fractions and fractions[-1] == pytest.approx(0.8, abs=0.03)  # k = 4, relabeled in the shards
    assert any("rollout/success_rate" in r for r in records)
    # Each actor's episodes went whole to its own shard: no episode id is in both shards.
    spec = TransitionSpec.for_env(describe_env(cfg.env))
    episodes = []
    checkpoints = tmp_path / "run" / "checkpoints"
    for shard, entry in enumerate(load_checkpoint(checkpoints)["replay"]["shards"]):
        table = make_table(cfg, spec, shard, 10, 64)
        table.restore(*read_shard(checkpoints, entry))
        stored = table.storage.data["episode"][:table.size]
        assert table.size > 500 and len(table.her.index.episodes) == len(set(stored.tolist()))
        episodes.append(set(stored.tolist()))
    assert not episodes[0] & episodes[1]
    assert wait_for_released_resources()


def test_learner_failure_stops_every_actor_with_the_cause(tmp_path):
    with pytest.raises(FleetError, match="learner failed: InjectedFault: injected fault in the learner at update 30"):
        run(tmp_path, "actors.num=2", parts=failing_learner(at_update=30))
    assert wait_for_released_resources()
    assert not (tmp_path / "run" / "summary.json").exists()


def test_failed_env_actor_is_restarted_and_counted(tmp_path):
    lines = []
    cfg = load_config("pointmass", [*SHORT, "actors.num=2", "train.total_env_steps=1500"])
    summary = train_fleet(cfg, tmp_path / "run", echo=lines.append, parts=failing_env_actor(1, at_step=200))
    assert summary["actors"]["restarts"] == 1
    assert summary["env_steps"] >= 1500
    assert any("env actor 1 failed (InjectedFault: injected fault in env actor 1 at step 200)" in line
               for line in lines)
    assert wait_for_released_resources()


def _ray_worker_pids(name: str, running: str = "") -> list[int]:
    """Pids of this test session's Ray workers (descendants of this process, whose Ray it is) whose
    process title is `ray::<name>...` (and shows it running method `running`, if given); another Ray
    on the machine is left alone."""
    children = children_by_parent()
    pids, stack = [], list(children.get(os.getpid(), []))
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                title = handle.read().decode(errors="replace")
            head = title.split("\0")[0]
            if (title.startswith("ray::") and actor_title(head) == f"ray::{name}"
                    and (not running or head.endswith(f".{running}"))):
                pids.append(pid)
        except OSError:
            continue
    return pids


def test_env_actor_killed_with_sigkill_is_counted_and_reported(tmp_path):
    lines = []
    cfg = load_config("pointmass", [*SHORT, "actors.num=2", "train.total_env_steps=4000"])
    killed = []

    def kill_one_actor():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any("steps" in line and "1,000/" not in line for line in lines[1:]):
            time.sleep(0.2)  # until the fleet has made progress
        pids = _ray_worker_pids("EnvActor")
        if pids:
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    killer = threading.Thread(target=kill_one_actor)
    killer.start()
    summary = train_fleet(cfg, tmp_path / "run", echo=lines.append)
    killer.join()
    assert killed, "no env actor process was found to kill"
    assert summary["actors"]["restarts"] == 1 and summary["env_steps"] >= 4000
    reported = [line for line in lines if line.startswith("env actor") and "process died" in line
                and "restarting it (1/3)" in line]
    assert len(reported) == 1, lines
    assert killed[0] not in _ray_worker_pids("EnvActor")
    assert wait_for_released_resources()


def stuck_env_actor(actor: int, at_step: int) -> FleetParts:
    """Fleet parts whose env actor `actor` blocks forever in its env step `at_step` (first process only)
    while its process goes on answering calls: an env stuck in a call that never returns."""

    class StuckEnvActor(EnvActor):
        def rollout(self, stream):
            rollout = super().rollout(stream)
            if (self.actor_index, stream) == (actor, actor):
                step = rollout.step

                def stuck(random_actions):
                    while rollout.steps == at_step:
                        time.sleep(1.0)
                    return step(random_actions)

                rollout.step = stuck
            return rollout

    return FleetParts(env_actor=StuckEnvActor)


@pytest.mark.parametrize("how", ["stopped", "stuck"])
def test_a_hung_env_actor_is_killed_restarted_and_counted(tmp_path, how):
    """SIGSTOP (its statistics go unanswered) or an env step that never returns (it answers, but its
    steps stand still while replay does not hold it back): restarted after train.hang_timeout_s."""
    lines = []
    # Steps enough that the other actor alone runs well past the 5 s in which the hang is judged: at 4,000
    # it once finished first (in about 4 s), and the hang was then found only as the fleet stopped.
    cfg = load_config("pointmass", [*SHORT, "actors.num=2", "train.total_env_steps=8000", "train.hang_timeout_s=5"])
    parts, stopped = FleetParts(), []
    if how == "stopped":
        thread, stopped = kill_when("EnvActor", lambda: any(
            line.startswith("steps") and "updates         0" not in line for line in lines[1:]), how=signal.SIGSTOP)
    else:
        parts = stuck_env_actor(actor=1, at_step=600)
    summary = train_fleet(cfg, tmp_path / "run", echo=lines.append, parts=parts)
    if how == "stopped":
        thread.join()
        assert stopped, "no env actor process was found to stop"
        assert stopped[0] not in _ray_worker_pids("EnvActor")  # killed, not left behind stopped
    said = ("no answer to a statistics call within 5 s" if how == "stopped"
            else "no env step for 5 s while not held back by replay")
    assert summary["actors"]["restarts"] == 1 and summary["actors"]["hung"] == 1, lines
    assert summary["recovery"]["failures"] == 0 and summary["env_steps"] >= 8000
    assert [line for line in lines if line.startswith("env actor") and f"hung ({said}; killed it); restarting it "
                                                                       f"(1/3)" in line], lines
    assert wait_for_released_resources()


def test_an_env_actor_that_hangs_as_the_run_stops_is_killed_and_counted(tmp_path):
    """Stopped (SIGSTOP) just as the run stops, before train.hang_timeout_s could find it silent: it does
    not stop either, so it is killed and counted as hung then (a chaos run had left such a one uncounted)."""
    lines, stopped = [], []

    def echo(line: str) -> None:
        lines.append(line)
        if line.startswith("stopping ("):  # the driver stops the actors right after saying so
            stopped.append(_ray_worker_pids("EnvActor")[0])
            os.kill(stopped[0], signal.SIGSTOP)

    cfg = load_config("pointmass", [*SHORT, "actors.num=2", "train.hang_timeout_s=5"])
    summary = train_fleet(cfg, tmp_path / "run", echo=echo)
    assert summary["actors"]["restarts"] == 1 and summary["actors"]["hung"] == 1, lines
    assert [line for line in lines if line.startswith("env actor") and line.endswith(
        "hung (did not stop within 5 s; killed it) as the fleet stopped; not restarted (1/3)")], lines
    assert not summary["failed"] and wait_for_released_resources()
    deadline = time.monotonic() + 30
    while stopped[0] in _ray_worker_pids("EnvActor") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert stopped[0] not in _ray_worker_pids("EnvActor")  # killed, not left behind stopped


def kill_when(name: str, ready, timeout: float = 120.0, how: int = signal.SIGKILL) -> tuple[threading.Thread, list[int]]:
    """A thread that SIGKILLs (or stops, with `how`=SIGSTOP) one `ray::<name>` process once `ready()`;
    the pid signalled lands in the list."""
    killed: list[int] = []

    def kill():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not ready():
            time.sleep(0.1)
        pids = _ray_worker_pids(name)
        if pids:
            os.kill(pids[0], how)
            killed.append(pids[0])

    thread = threading.Thread(target=kill)
    thread.start()
    return thread, killed


def learning_with_a_checkpoint(run_dir, lines):
    """True once the run is updating and has committed a checkpoint set."""
    return (run_dir / "checkpoints" / "checkpoint.pt").exists() and any(
        line.startswith("steps") and "updates         0" not in line for line in lines[1:])


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "stopped"])
@pytest.mark.parametrize("component, process", [("replay shard 0", "ReplayShard"), ("learner", "LearnerService")])
def test_a_killed_or_hung_shard_or_learner_is_recovered_in_place_and_the_run_finishes(tmp_path, component, process,
                                                                                        how):
    """SIGKILL, or SIGSTOP as a process stuck in a syscall or a deadlock would look: a stopped one is
    found silent after train.hang_timeout_s, killed, and recovered like a dead one."""
    lines = []
    run_dir = tmp_path / "run"
    cfg = load_config("pointmass", [*SHORT, "actors.num=2", "train.total_env_steps=5000", "checkpoint.interval=150",
                                    "train.hang_timeout_s=5"])
    thread, killed = kill_when(process, lambda: learning_with_a_checkpoint(run_dir, lines), how=how)
    summary = train_fleet(cfg, run_dir, echo=lines.append)
    thread.join()
    assert killed, f"no {process} process was found to kill"
    recovery = summary["recovery"]
    assert recovery["failures"] == 1 and summary["actors"]["restarts"] == 0, lines
    [event] = recovery["events"]
    if how == signal.SIGSTOP:
        assert event["component"] == component and event["hung"] and recovery["hung"] == 1, event
        # Found by its status call, or by a checkpoint's call when one falls due in the silence.
        call = re.fullmatch(r"hung: (no answer to a (status|checkpoint) call within 5 s.*)", event["cause"])
        assert call, event
        assert [line for line in lines if line.startswith(f"{component} hung ({call[1]}; killed it); recovering it")], lines
    else:
        assert event["component"] == component and "process died" in event["cause"] and not event["hung"]
        assert [line for line in lines if line.startswith(f"{component} failed (process died")], lines
    assert [line for line in lines if line.startswith(f"{component} recovered in")], lines
    assert killed[0] not in _ray_worker_pids(process)
    # The run ends as planned, and its counters add up: what the shards hold is what was collected
    # less what the recovered shard lost (the capacity is not reached).
    assert summary["env_steps"] >= 5000 and summary["stop_reason"] == "train.total_env_steps reached"
    assert summary["replay"]["size"] == summary["env_steps"] - recovery["lost_transitions"]
    if component == "learner":
        assert recovery["lost_transitions"] == 0 and event["lost_updates"] >= 0
    else:
        assert recovery["lost_updates"] == 0 and event["lost_transitions"] >= 0
    # Learning went on after the recovery at the configured ratio.
    assert summary["replay"]["samples_per_insert"] == pytest.approx(32, rel=0.15)
    state = load_checkpoint(run_dir)
    assert state["learner"]["updates"] == summary["updates"] and state["env_steps"] == summary["env_steps"]
    # The counters saved with a checkpoint are what its snapshots hold (plus what recoveries lost).
    assert state["env_steps"] == sum(e["inserts"] for e in state["replay"]["shards"]) + recovery["lost_transitions"]
    assert state["fleet"]["recoveries"] == recovery["events"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "fleet/recoveries" in r][-1]
    assert (last["fleet/recoveries"], last["fleet/lost_transitions"], last["fleet/lost_updates"]) == (
        1, recovery["lost_transitions"], recovery["lost_updates"])
    said = "recovered 1 (1 hung; lost" if how == signal.SIGSTOP else "recovered 1 (lost"
    assert any(line.startswith("steps") and said in line for line in lines), lines
    assert wait_for_released_resources()


@pytest.mark.parametrize("component, process", [("learner", "LearnerService"), ("replay shard 0", "ReplayShard")])
def test_a_component_silent_in_a_checkpoint_call_is_recovered_at_once(tmp_path, component, process):
    """A checkpoint is due while the learner (or a shard) is stopped: its call goes unanswered for
    train.hang_timeout_s, and that is the hang, recovered then and there. (A chaos run had waited a
    second full timeout on its status, and after that a second checkpoint's.)"""
    lines = []
    run_dir = tmp_path / "run"
    cfg = load_config("pointmass", [*SHORT, "actors.num=2", "train.total_env_steps=3000", "checkpoint.interval_s=1",
                                    "train.hang_timeout_s=5", "train.log_interval=100000"])
    # No progress lines to wait for (a log would wait on the learner's status): two sets committed will do.
    thread, stopped = kill_when(process, lambda: (run_dir / "checkpoints" / "checkpoint.1.pt").exists(),
                                how=signal.SIGSTOP)
    summary = train_fleet(cfg, run_dir, echo=lines.append)
    thread.join()
    assert stopped, f"no {process} process was found to stop"
    [event] = summary["recovery"]["events"] or [lines]
    assert event["component"] == component and event["hung"], event
    said = "no answer to a checkpoint call within 5 s, nor to a status call within 5 s"
    assert event["cause"] == f"hung: {said}", event
    who = "the learner" if component == "learner" else component
    skipped = [i for i, line in enumerate(lines) if line == f"checkpoint skipped: {who} did not answer within 5 s"]
    assert len(skipped) == 1 and lines[skipped[0] + 1].startswith(f"{component} hung ({said}; killed it); "
                                                                  "recovering it"), lines
    assert stopped[0] not in _ray_worker_pids(process)
    assert summary["env_steps"] >= 3000 and not summary["failed"]
    assert wait_for_released_resources()


def test_a_learner_busy_holding_its_update_lock_past_the_hang_timeout_is_not_taken_for_hung(tmp_path):
    """A first block of updates 15 s long (a first compile or CUDA graph capture holds the update lock
    as long) under train.hang_timeout_s=5, with progress records and checkpoints falling due meanwhile
    (a wide error buffer lets the actors collect on): the records go without the learner's metrics,
    the checkpoints are skipped, nothing is killed."""
    lines = []
    cfg = load_config("pointmass", [*SHORT, "actors.num=2", "train.total_env_steps=6000", "checkpoint.interval_s=1",
                                    "train.hang_timeout_s=5", "train.log_interval=200", "replay.error_buffer=1e8"])
    summary = train_fleet(cfg, tmp_path / "run", echo=lines.append, parts=slow_first_block_learner(15.0))
    assert summary["recovery"]["failures"] == 0 and summary["actors"]["restarts"] == 0, lines
    skipped = lines.index("checkpoint skipped: the learner did not answer within 5 s")
    assert lines[skipped + 1].startswith("  it answers status calls, so it is busy"), lines
    assert not any(" hung (" in line for line in lines), lines
    assert summary["env_steps"] >= 6000 and summary["updates"] > 0 and not summary["failed"]
    assert wait_for_released_resources()


@pytest.mark.parametrize("moment, how", [("between evaluations", signal.SIGKILL),
                                         ("during an evaluation", signal.SIGKILL),
                                         ("during an evaluation", signal.SIGSTOP)], ids=["idle", "evaluating", "hung"])
def test_a_killed_or_hung_eval_actor_is_counted_once(tmp_path, moment, how):
    """Ray restarts a killed eval actor silently, and calls fail while it restarts: one death, one
    count, whether it was idle (eval.interval=0) or evaluating (an evaluation every 1,000 steps). One
    stopped mid-evaluation is found silent after train.hang_timeout_s and killed: one count too."""
    lines = []
    if moment == "between evaluations":
        cfg = load_config("pointmass", [*SHORT, "actors.num=2", "train.total_env_steps=4000", "eval.final_episodes=20"])
        thread, killed = kill_when("EvalActor", lambda: any(
            line.startswith("steps") and "updates         0" not in line for line in lines[1:]))
    else:
        cfg = load_config("pointmass", [*SHORT, "actors.num=2", "train.total_env_steps=4000", "eval.interval=1000",
                                        "eval.episodes=100", "eval.final_episodes=20", "train.hang_timeout_s=5"])
        thread, killed = kill_when("EvalActor", lambda: _ray_worker_pids("EvalActor", running="evaluate"), how=how)
    summary = train_fleet(cfg, tmp_path / "run", echo=lines.append)
    thread.join()
    assert killed, "no EvalActor process was found to kill"
    recovery = summary["recovery"]
    assert recovery["failures"] == 1 and summary["actors"]["restarts"] == 0, lines
    [event] = recovery["events"]
    cause = "hung: no answer to a status call within 5 s" if how == signal.SIGSTOP else "process died"
    assert event["component"] == "eval actor" and cause in event["cause"] and event["hung"] == (how == signal.SIGSTOP)
    said = "nothing was lost" if moment == "between evaluations" else "the evaluation runs again"
    start = "eval actor hung (no answer" if how == signal.SIGSTOP else "eval actor failed"
    assert [line for line in lines if line.startswith(start) and said in line], lines
    # The restarted process ran the whole final evaluation.
    assert summary["eval"]["episodes"] == 20 and np.isfinite(summary["eval"]["return_mean"])
    assert killed[0] not in _ray_worker_pids("EvalActor")
    assert wait_for_released_resources()


def test_a_fleet_run_on_a_disk_that_fills_stops_in_order_and_its_last_set_resumes(small_disk):
    """The run directory's filesystem fills once the first set is written: two sets in a row cannot
    be written (their replay segments, streamed through the driver), the run stops in order, and
    after the disk is freed the set written before resumes."""
    lines, run_dir = [], small_disk.path / "run"

    def echo(line: str) -> None:
        lines.append(line)
        if (len(lines) > 1 and line.startswith("steps") and (run_dir / "checkpoints" / "checkpoint.pt").exists()
                and not (small_disk.path / "filler").exists()):
            small_disk.fill()

    overrides = [*SHORT, "actors.num=2", "train.total_env_steps=100000", "checkpoint.interval=150",
                 "checkpoint.interval_s=0", "checkpoint.max_write_failures=2"]
    with pytest.raises(RunStopped, match="checkpoints could not be written 2 times in a row: cannot write"):
        train_fleet(load_config("pointmass", overrides), run_dir, echo=echo)
    failures = [line for line in lines if line.startswith("checkpoint not written (")]
    assert len(failures) == 2 and "No space left on device" in failures[1], lines
    [done] = [line for line in lines if line.startswith("done (")]
    assert done.startswith("done (checkpoints could not be written 2 times in a row: cannot write ") and (
        "summary NOT written (cannot write" in done), done

    small_disk.free()
    kept = load_checkpoint(run_dir)
    more = load_config("pointmass", [*overrides, f"train.total_env_steps={kept['env_steps'] + 1000}"])
    summary = train_fleet(more, run_dir, resume=True, echo=lines.append)
    assert summary["env_steps"] >= kept["env_steps"] + 1000 and not summary["failed"]
    assert summary["replay"]["restored_size"] == kept["env_steps"]
    assert wait_for_released_resources()


def test_processes_lost_together_count_as_one_failure():
    """A lost node takes several processes within seconds: train.max_failures counts incidents."""
    from sacfleet.driver import recovery as recovery_module

    clock = [1000.0]
    lines = []
    cfg = load_config("pointmass", ["train.max_failures=2"])
    # A resumed run's earlier events: two of one incident, and one saved before incidents were recorded.
    def event(component, **more):
        return {"component": component, "cause": "process died", "env_steps": 5, "seconds": 1.0,
                "lost_transitions": 0, "lost_updates": 0, **more}

    earlier = [event("learner", incident=1), event("replay shard 0", incident=1), event("eval actor")]
    rec = recovery_module.FleetRecovery(cfg, None, None, lines.append, earlier=earlier, clock=lambda: clock[0])
    assert rec.failures == 2
    cfg = load_config("pointmass", ["train.max_failures=3"])
    rec = recovery_module.FleetRecovery(cfg, None, None, lines.append, earlier=earlier, clock=lambda: clock[0])
    rec.evaluator("process died", 10)
    clock[0] += 4.0
    rec.evaluator("process died", 20)  # noticed 4 s after the previous one: the same failure
    totals = rec.totals()
    assert (totals["failures"], totals["recoveries"]) == (3, 5)
    assert [e["incident"] for e in totals["events"][3:]] == [3, 3]
    assert lines[-1].endswith("(failure 3/3)"), lines
    clock[0] += 5.5  # 5.5 s after the last: a new failure, past the limit
    with pytest.raises(FleetError, match=r"eval actor failed \(process died\) after the fleet had recovered "
                                         r"from 3 failures \(train.max_failures=3\)"):
        rec.evaluator("process died", 30)


def test_env_actor_failing_too_often_stops_the_run_with_the_learners_state_saved(tmp_path):
    # Env actor 0 fails at its step 700, when the fleet (two actors) is past learning_starts=400.
    with pytest.raises(FleetError, match=r"env actor 0 failed 1 times \(actors.max_restarts=0\)") as info:
        run(tmp_path, "actors.num=2", "actors.max_restarts=0", parts=failing_env_actor(0, at_step=700))
    assert "the learner's state" in str(info.value) and "were saved" in str(info.value)
    state = load_checkpoint(tmp_path / "run")
    assert state["learner"]["updates"] > 0 and 1000 <= state["env_steps"] < 2500
    assert wait_for_released_resources()


def _chunk(spec: TransitionSpec, n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    batch = spec.empty(n)
    for name in ("obs", "action", "next_obs", "reward"):
        batch[name] = rng.standard_normal(batch[name].shape).astype(np.float32)
    return batch


def test_malformed_chunk_is_rejected_and_the_shard_is_unchanged():
    cfg = load_config("pointmass", ["replay.capacity=1000", "learner.batch_size=8", "train.learning_starts=1000"])
    spec = TransitionSpec(2, 1)
    shard = ray.remote(ReplayShard).remote(cfg, TransitionSpec(2, 1), 0)
    try:
        assert ray.get(shard.insert.remote(encode_chunk(_chunk(spec, 20, 0), spec)))["ok"]
        before_stats, before = ray.get(shard.stats.remote()), shard_contents(shard)

        wrong_dims = TransitionSpec(3, 1)
        bad_payloads = {
            "garbage": b"\x00not msgpack at all",
            "truncated": encode_chunk(_chunk(spec, 20, 1), spec)[:-7],
            "wrong obs_dim": encode_chunk(_chunk(wrong_dims, 5, 2), wrong_dims),
        }
        nan = encode_chunk(_chunk(spec, 5, 3), spec)
        bad_payloads["NaN reward"] = nan.replace(np.float32(_chunk(spec, 5, 3)["reward"][0]).tobytes(),
                                                 np.float32("nan").tobytes())
        for what, payload in bad_payloads.items():
            with pytest.raises(CodecError) as info:
                ray.get(shard.insert.remote(payload))
            assert str(info.value), what
        with pytest.raises(CodecError, match="obs: shape"):
            ray.get(shard.insert.remote(bad_payloads["wrong obs_dim"]))
        with pytest.raises(CodecError, match="NaN"):
            ray.get(shard.insert.remote(bad_payloads["NaN reward"]))

        after_stats, after = ray.get(shard.stats.remote()), shard_contents(shard)
        assert after_stats == before_stats and after == before
        assert ray.get(shard.insert.remote(encode_chunk(_chunk(spec, 4, 4), spec)))["inserted"] == 4
    finally:
        ray.kill(shard)


def shard_contents(shard) -> tuple:
    """A whole snapshot of a shard actor (header and every segment)."""
    start = ray.get(shard.snapshot_begin.remote())
    segments = ray.get([shard.snapshot_segment.remote(j) for j in range(start["num_segments"])])
    ray.get(shard.snapshot_end.remote())
    return start["header"], segments


def _initial_learner_state(seed: int, session: int = 0) -> dict:
    """The learner's state right after it starts in its own Ray worker process, as a fleet builds it."""
    cfg = load_config("pointmass", [*SHORT, f"train.seed={seed}"])
    learner = ray.remote(LearnerService).options(num_cpus=0.1).remote(cfg, describe_env(cfg.env), {}, 1, session)
    try:
        return ray.get(learner.state.remote())
    finally:
        ray.kill(learner)


def test_train_seed_sets_the_fleet_learners_initial_networks():
    first, again, other = _initial_learner_state(3), _initial_learner_state(3), _initial_learner_state(4)
    for net in ("actor", "critic"):
        for name, tensor in first[net].items():
            torch.testing.assert_close(tensor, again[net][name], rtol=0, atol=0)
    assert not torch.equal(first["actor"]["trunk.0.weight"], other["actor"]["trunk.0.weight"])
    # The same networks `--inline` starts from with that seed.
    cfg = load_config("pointmass", [*SHORT, "train.seed=3"])
    seed_everything(3)
    inline = SACLearner.from_config(cfg.learner, describe_env(cfg.env), "cpu")
    torch.testing.assert_close(inline.actor.trunk[0].weight, first["actor"]["trunk.0.weight"], rtol=0, atol=0)


def test_a_diverging_fleet_learner_stops_the_run_named_and_keeps_the_last_good_checkpoint(tmp_path):
    common = [*SHORT, "actors.num=1", "learner.symlog_q=false"]
    run_dir = tmp_path / "run"
    first = train_fleet(load_config("pointmass", common), run_dir, echo=lambda line: None)
    checkpoint = run_dir / "checkpoints" / "checkpoint.pt"
    kept = checkpoint.read_bytes()
    updates = load_checkpoint(checkpoint)["learner"]["updates"]
    assert updates == first["updates"] > 0
    # Rewards scaled far past float32 on a resume: the first update of the new session overflows.
    lines = []
    with pytest.raises(FleetError, match=rf"learner diverged at update {updates + 1}: non-finite train/critic_loss.*"
                                         rf"the last good checkpoint \({updates:,} updates"):
        train_fleet(load_config("pointmass", [*common, "learner.reward_scale=1e30", "train.total_env_steps=20000"]),
                    run_dir, resume=True, echo=lines.append)
    assert checkpoint.read_bytes() == kept
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["failed"] and summary["health"]["diverged"]["update"] == updates + 1
    last_record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last_record["health/diverged_at_update"] == updates + 1
    # The diverged weights never reached an actor: no actor failed decoding them.
    assert not any("env actor" in line for line in lines), lines
    assert wait_for_released_resources()


def test_a_failed_priority_update_surfaces_in_the_learner_instead_of_vanishing():
    from ray.exceptions import RayTaskError

    from sacfleet.replay_server.client import PRIORITY_CHECK_EVERY, SampleClient

    cfg = load_config("pointmass", ["replay.capacity=1000", "learner.batch_size=8", "train.learning_starts=8",
                                    "replay.sampler=prioritized"])
    spec = TransitionSpec(2, 1)
    shard = ray.remote(ReplayShard).remote(cfg, TransitionSpec(2, 1), 0)
    try:
        ray.get(shard.insert.remote(encode_chunk(_chunk(spec, 20, 0), spec)))
        client = SampleClient([shard], 1, 8, timeout_s=10)
        keys = np.arange(8)
        for _ in range(PRIORITY_CHECK_EVERY - 1):  # good ones go through without waiting
            client.update_priorities(0, keys, np.ones(8))
        ray.get(client.priority_updates)
        client.update_priorities(0, keys, np.ones(5))  # a shard refuses 8 keys with 5 priorities
        with pytest.raises(RayTaskError, match="8 keys but 5 priorities"):
            for _ in range(PRIORITY_CHECK_EVERY):
                client.update_priorities(0, keys, np.ones(8))
                time.sleep(0.01)
    finally:
        ray.kill(shard)


@pytest.mark.parametrize("how", ["hung", "died"])
def test_an_evaluation_failing_after_its_hung_actor_was_replaced_is_not_a_second_failure(monkeypatch, how):
    """The order a slow-chaos run met: the eval actor hangs mid-evaluation and is killed (counted), its
    new process answers its pid, and only then does the killed evaluation's failure come back. That
    failure was counted a second time; now the evaluation just runs again. The same when it died and
    the new process's pid is the first sign."""
    from ray.exceptions import RayActorError

    from sacfleet.driver import evaluations as module

    class Answers:  # the pid calls: silent past the timeout, then the new process's pid
        def __init__(self):
            self.script = [module.Hung("hung: no answer to a status call within 10 s"), 222] if how == "hung" else [222]

        def answer(self, name, send, wait=False):
            return self.script.pop(0) if self.script else 222

        def drop(self, name):
            pass

    class Evaluator:
        class pid:
            remote = None  # what Answers stands in for

        class evaluate:
            started = []

            @classmethod
            def remote(cls, episodes, weights_above):
                cls.started.append(episodes)
                return f"evaluation {len(cls.started)}"

    class Recovery:
        events = []

        def evaluator(self, cause, env_steps, evaluating=True, hung=False):
            self.events.append((cause, evaluating, hung))

    def get(ref):
        raise RayActorError()  # the first evaluation's process was killed

    monkeypatch.setattr(module, "kill_for_restart", lambda handle: None)
    monkeypatch.setattr(module.ray, "wait", lambda refs, timeout=0: (refs, []))
    monkeypatch.setattr(module.ray, "get", get)
    monkeypatch.setattr(module.time, "sleep", lambda s: None)
    recovery = Recovery()
    evals = module.Evaluations(Evaluator(), Answers(), recovery, env_steps=lambda: 1000)
    evals.pid = 111
    Evaluator.evaluate.started.clear()
    assert evals.start(10)
    evals.watch()  # hung: no answer in time, counted, killed; died: the new process answers, counted
    evals.watch()  # the new process answers
    assert evals.result() is None  # the killed evaluation failed: it runs again, not counted again
    assert recovery.events == ([("hung: no answer to a status call within 10 s", True, True)] if how == "hung"
                               else [("process died: Ray restarted it", True, False)])
    assert Evaluator.evaluate.started == [10, 10] and evals.ref == "evaluation 2"


def test_a_fresh_status_waited_for_behind_an_unanswered_one_is_hung_after_one_timeout():
    """A progress record waits for a fresh status with the metrics. When the status call in flight is
    the one left unanswered, that is the answer: a chaos run had sent a second call and waited a
    second full timeout (60 s in all) before it recovered a stopped learner."""
    from sacfleet.driver.calls import Hung, PendingCalls

    class Silent:  # defined here: Ray workers cannot import a test module
        def __init__(self):
            self.calls = 0

        def status(self):
            self.calls += 1
            threading.Event().wait()  # never answers, as a stopped or deadlocked process

        def count(self) -> int:
            return self.calls

    silent = ray.remote(Silent).options(num_cpus=0.01, max_concurrency=4).remote()
    try:
        assert ray.get(silent.count.remote(), timeout=60) == 0  # started
        calls = PendingCalls(timeout=1.0)
        assert calls.answer("learner", silent.status.remote) is None  # in flight, not waited for
        hung = calls.fresh("learner", silent.status.remote)
        assert isinstance(hung, Hung) and "learner" not in calls
        assert ray.get(silent.count.remote(), timeout=10) == 1
    finally:
        ray.kill(silent)


def test_env_actors_ask_for_weights_at_most_every_20_ms(monkeypatch):
    from sacfleet.actors import env_actor

    class CountingWeights:  # defined here: Ray workers cannot import a test module
        """A learner stand-in that counts weight requests and publishes version 1."""

        def __init__(self):
            self.calls = 0

        def latest_weights(self, have_version: int):
            self.calls += 1
            return (1, b"weights") if have_version < 1 else None

        def count(self) -> int:
            return self.calls

    monkeypatch.setattr(env_actor, "decode_weights", lambda payload: ({}, 1))
    source = ray.remote(CountingWeights).options(num_cpus=0.01).remote()
    try:
        assert ray.get(source.count.remote(), timeout=60) == 0  # started: the window below times polls only
        puller = env_actor.WeightPuller(source, env_actor.WEIGHT_POLL_MIN_S)
        got, start = [], time.monotonic()
        while time.monotonic() - start < 0.5:  # a sync point every 0.5 ms, as a fast actor has
            fresh = puller.poll(-1 if not got else 1)
            if fresh is not None:
                got.append(fresh)
            time.sleep(0.0005)
        calls = ray.get(source.count.remote())
        assert got == [({}, 1)]  # the new version arrived, once
        assert 5 <= calls <= 0.5 / env_actor.WEIGHT_POLL_MIN_S + 1, calls  # not one per sync point (~700)
    finally:
        ray.kill(source)


def test_a_start_whose_deadline_passes_between_checks_gives_up_with_the_cause(monkeypatch):
    """The deadline can pass between the wait loop's check and its next ray.wait: once, in a full
    suite, the wait was handed a negative timeout and Ray raised ValueError instead of the cause."""
    from sacfleet.driver import fleet as fleet_module

    @ray.remote(num_cpus=100)
    class Unplaceable:
        def ping(self) -> bool:
            return True

    # Clock readings: the start, the first wait's timeout, the check (3.4 s: not yet), then past it.
    readings = iter([0.0, 0.0, 3.4])
    monkeypatch.setattr(fleet_module, "WAIT_NOTE_S", 0.2)
    monkeypatch.setattr(fleet_module, "START_TIMEOUT_S", 3.5)
    lines: list[str] = []
    handle = Unplaceable.remote()
    try:
        with pytest.raises(FleetError, match=r"1 replay shard\(s\) did not start within 3.5 s: Ray has not placed"):
            fleet_module.wait_started([handle], "replay shard", lines.append, clock=lambda: next(readings, 3.6))
        assert len(lines) == 1 and lines[0].startswith("waiting for 1 of 1 replay shard(s) to start (3 s)"), lines
    finally:
        ray.kill(handle)


def test_a_fleet_ray_cannot_place_says_so_while_it_waits_and_leaves_nothing_behind(tmp_path, monkeypatch):
    from sacfleet.driver import fleet as fleet_module

    @ray.remote(num_cpus=2)
    class OtherWork:  # holds every CPU the plan counted on, as another job on a shared cluster would
        def ping(self) -> bool:
            return True

    monkeypatch.setattr(fleet_module, "WAIT_NOTE_S", 1.0)
    monkeypatch.setattr(fleet_module, "START_TIMEOUT_S", 3.5)
    other = OtherWork.remote()
    ray.get(other.ping.remote())
    lines: list[str] = []
    try:
        with pytest.raises(FleetError, match=r"1 replay shard\(s\) did not start within 3.5 s: Ray has not placed"):
            train_fleet(load_config("pointmass", SHORT), tmp_path / "run", echo=lines.append)
        assert sum(line.startswith("waiting for 1 of 1 replay shard(s) to start") for line in lines) >= 2, lines
    finally:
        ray.kill(other)
    # The shard that was waiting is gone too: every CPU is free again.
    deadline = time.monotonic() + 20
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 2
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True) if "sacfleet-" in str(a)]


OLD_RUN = Path(__file__).parent / "data" / "run-c99ef5f"


def test_a_run_directory_written_before_the_driver_package_resumes(tmp_path):
    """tests/data/run-c99ef5f: a fleet run stopped at 1,420 env steps by the code of commit c99ef5f,
    before the driver's modules moved into sacfleet/driver/. It resumes with its learner state, its
    replay snapshot and its earlier session's counters."""
    run_dir = tmp_path / "run"
    shutil.copytree(OLD_RUN, run_dir)
    cfg = load_config(str(run_dir / "config.yaml"), ["train.total_env_steps=2400", "eval.interval=0"])
    lines = []
    summary = train_fleet(cfg, run_dir, resume=True, echo=lines.append)
    assert any(line.startswith("resuming at 1,420 env steps, 496 updates, replay restored") for line in lines), lines
    assert summary["replay"]["restored_size"] == 1420 and summary["env_steps"] >= 2400
    assert summary["updates"] > 496 and summary["eval"]["curve"][:2] == json.loads(
        (OLD_RUN / "summary.json").read_text())["eval"]["curve"]
    state = load_checkpoint(run_dir)
    assert state["fleet"]["session"] == 1 and state["env_steps"] == summary["env_steps"]
    assert wait_for_released_resources()


def test_an_env_actor_that_stops_pushes_what_it_collected_since_its_last_chunk():
    class NoWeights:  # a learner stand-in that never has weights: the actor acts at random
        def latest_weights(self, have_version: int):
            return None

        def ping(self) -> bool:
            return True

    cfg = load_config("pointmass", ["replay.capacity=100000", "train.learning_starts=100000",
                                    "actors.chunk_length=7", "actors.envs_per_actor=2"])
    env_info = describe_env(cfg.env)
    tag = os.urandom(4).hex()
    peers = {"shards": [f"test-{tag}-shard"], "learner": f"test-{tag}-learner"}
    shard = ray.remote(ReplayShard).options(num_cpus=0.01, name=peers["shards"][0]).remote(
        cfg, TransitionSpec.for_env(env_info), 0)
    source = ray.remote(NoWeights).options(num_cpus=0.01, name=peers["learner"]).remote()
    actor = None
    try:
        ray.get([shard.ping.remote(), source.ping.remote()])
        actor = ray.remote(EnvActor).options(num_cpus=0.01, max_concurrency=2).remote(cfg, env_info, 0, peers)
        run_ref = actor.run.remote(0)
        deadline = time.monotonic() + 60
        while ray.get(actor.stats.remote())["steps"] < 500 and time.monotonic() < deadline:
            time.sleep(0.05)
        actor.stop.remote()
        steps = ray.get(run_ref, timeout=60)
        assert steps >= 500
        assert ray.get(shard.stats.remote())["inserts"] == steps  # none left behind in a partial chunk
    finally:
        for handle in (actor, shard, source):
            if handle is not None:
                ray.kill(handle)


def recording_env_actor(path: Path) -> FleetParts:
    """Fleet parts whose env actors append to `path`, as JSON lines, each policy they load (its version
    and observation statistics) and, whenever they widen, the bounds of the observations they made."""

    class RecordingEnvActor(EnvActor):
        def rollout(self, stream):
            rollout = super().rollout(stream)
            load, step = rollout.load_weights, rollout.step
            bounds = {}

            def record(line):
                with open(path, "a") as out:
                    out.write(json.dumps(line) + "\n")

            def loading(weights, version):
                load(weights, version)
                record({"version": int(version), "count": float(weights["obs_norm.count"]),
                        "mean": np.asarray(weights["obs_norm.mean"]).tolist(),
                        "var": np.asarray(weights["obs_norm.var"]).tolist()})

            def stepping(random_actions):
                # Recorded before the transitions leave the actor, so every observation a learner
                # can sample lies within bounds already written.
                transitions = step(random_actions)
                low = np.minimum(bounds.get("low", np.inf), transitions["obs"].min(axis=0))
                high = np.maximum(bounds.get("high", -np.inf), transitions["obs"].max(axis=0))
                if not bounds or np.any(low < bounds["low"]) or np.any(high > bounds["high"]):
                    bounds.update(low=low, high=high)
                    record({"low": low.tolist(), "high": high.tolist()})
                return transitions

            rollout.load_weights, rollout.step = loading, stepping
            return rollout

    return FleetParts(env_actor=RecordingEnvActor)


def test_a_fleet_run_publishes_the_observation_statistics_with_each_weight_version(tmp_path):
    """With learner.obs_norm each published version carries the statistics of exactly the batches its
    updates trained on (batch_size observations per update); none is published in the critic warm-up;
    the checkpoint holds the final statistics in every network's state."""
    log = tmp_path / "weights.jsonl"
    summary = run(tmp_path, "learner.obs_norm=true", "learner.critic_warmup=100", "actors.num=2",
                  parts=recording_env_actor(log))
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    loads = [line for line in lines if "version" in line]
    assert len({load["version"] for load in loads}) >= 3, loads
    assert all(load["version"] >= 100 and load["count"] == 64 * load["version"] for load in loads), loads[:5]
    newest = max(loads, key=lambda load: load["version"])
    state = load_checkpoint(tmp_path / "run")["learner"]
    count = state["actor"]["obs_norm.count"].item()
    assert count == 64 * state["updates"] >= newest["count"]
    for key in ("critic", "target_critic"):
        assert torch.equal(state[key]["obs_norm.mean"], state["actor"]["obs_norm.mean"])
    # Statistics of observations the actors made: each mean lies within their bounds, each variance
    # is positive and at most a quarter of the squared range (Popoviciu's bound).
    low = np.min([line["low"] for line in lines if "low" in line], axis=0)
    high = np.max([line["high"] for line in lines if "high" in line], axis=0)
    final = {"mean": state["actor"]["obs_norm.mean"].numpy(), "var": state["actor"]["obs_norm.var"].numpy()}
    for stats in (*loads, final):
        mean, var = np.asarray(stats["mean"]), np.asarray(stats["var"])
        assert np.all(low <= mean) and np.all(mean <= high), (low, stats, high)
        assert np.all(var > 0) and np.all(var <= (high - low) ** 2 / 4 * (1 + 1e-6)), (low, stats, high)
    assert summary["eval"]["episodes"] == 2


def test_a_crossq_fleet_run_acts_with_the_batch_renormalized_policy(tmp_path):
    """learner.critic=crossq with 3-step returns in the fleet: actors load each published version (batch renormalization's
    running statistics included) into the numpy policy; the checkpoint holds no target critics; a resume
    carries the running statistics and their step counts on."""
    log = tmp_path / "weights.jsonl"
    # Plain Q: crossq refuses the preset's symlog_q (test_critics).
    summary = run(tmp_path, "learner.critic=crossq", "learner.critic_hidden_sizes=[32, 32]", "learner.obs_norm=true",
                  "learner.symlog_q=false", "replay.n_step=3", parts=recording_env_actor(log))
    loads = [json.loads(line) for line in log.read_text().splitlines() if "version" in line]
    assert len({load["version"] for load in loads}) >= 3 and np.isfinite(summary["eval"]["return_mean"])
    state = load_checkpoint(tmp_path / "run")["learner"]
    assert "target_critic" not in state
    actor_steps = {int(value) for key, value in state["actor"].items() if key.endswith(".steps")}
    assert len(actor_steps) == 1 and 0 < actor_steps.pop() < state["updates"]  # one per policy update (delay 3)
    critic_steps = {key for key in state["critic"] if key.endswith(".steps")}
    assert {int(state["critic"][key]) for key in critic_steps} == {state["updates"]}  # one joint pass per update
    cfg = load_config(str(tmp_path / "run" / "config.yaml"), ["train.total_env_steps=3500"])
    train_fleet(cfg, tmp_path / "run", resume=True, echo=lambda line: None)
    resumed = load_checkpoint(tmp_path / "run")["learner"]
    assert resumed["updates"] > state["updates"]
    assert {int(resumed["critic"][key]) for key in critic_steps} == {resumed["updates"]}
