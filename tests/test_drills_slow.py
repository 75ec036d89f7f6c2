"""The chaos and soak drills as users run them (`make test-slow`): `sacfleet chaos` on the point-mass
preset, and the one-hour `sacfleet soak` at full load."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def drill(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sacfleet", *args], capture_output=True, text=True, timeout=timeout)


def test_chaos_run_finishes_learns_and_counts_every_kill(tmp_path):
    """A random env actor, replay shard, learner or eval actor SIGKILLed every 6 s. Seed 0 (7 kills:
    4 env actors, 2 shards, 1 eval actor) finished with exact counts and returned -5.1. Without the
    eval actor, seeds 0 to 4 all finished with exact counts; returns -5.7, -6.7, -5.2, -390,577
    (seed 3: four learner kills, and the run diverged), -6.4. Seed 0 is asserted."""
    run_dir = tmp_path / "chaos"
    done = drill("chaos", "--every", "6", "--seed", "0", "--set", "checkpoint.interval_s=10",
                 "--run-dir", str(run_dir), timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((run_dir / "chaos.json").read_text())
    assert report["finished"] and report["exact"] and len(report["kills"]) >= 3, report
    assert all(kill["reported"] for kill in report["kills"]), report
    assert report["eval_return"] >= -100, report


@pytest.mark.parametrize("targets, hang", [("ReplayShard,LearnerService", "1"),
                                           ("EnvActor,ReplayShard,LearnerService,EvalActor", "0.5")],
                         ids=["shard-and-learner-stopped", "mixed"])
def test_chaos_with_hangs_finishes_learns_and_counts_every_fault_as_it_was(tmp_path, targets, hang):
    """SIGSTOP in place of SIGKILL: every stopped shard and learner (first case), or half the faults
    of every kind (second), found silent after train.hang_timeout_s=10, killed and recovered. The run
    on the point-mass preset finishes with exit 0 and learns; nothing stopped is left behind."""
    run_dir = tmp_path / "chaos"
    done = drill("chaos", "--every", "8", "--seed", "0", "--targets", targets, "--hang", hang,
                 "--set", "checkpoint.interval_s=10", "--set", "train.hang_timeout_s=10",
                 "--run-dir", str(run_dir), timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((run_dir / "chaos.json").read_text())
    assert report["finished"] and report["exact"] and report["stopped"] >= 1 and not report["left_behind"], report
    assert all(kill["reported"] for kill in report["kills"]), report
    assert all(kill["hung_reported"] == (kill["signal"] == "SIGSTOP") for kill in report["kills"]), report
    assert report["eval_return"] >= -100, report


def test_one_hour_soak_at_full_load_grows_no_process_by_more_than_5_percent(tmp_path):
    run_dir = tmp_path / "soak"
    done = drill("soak", "--minutes", "60", "--run-dir", str(run_dir), timeout=4500)
    report = json.loads((run_dir / "soak.json").read_text())
    assert report["exit_code"] == 0, done.stdout[-3000:]
    kinds = {row["process"] for row in report["processes"]}
    assert {"ray::LearnerService", "ray::ReplayShard", "ray::EnvActor", "driver", "raylet"} <= kinds, kinds
    assert report["within_5_percent"], report["processes"]
