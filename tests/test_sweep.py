"""`sacfleet sweep`: trials on Ray Tune (each a real `sacfleet train` on the embedded Ray), statistics
checked against a direct computation, a failing trial that leaves the others alone, Ctrl-C and resume,
and a fleet trial in the placement group Tune reserved for it."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

from sacfleet.common.config import ConfigError
from sacfleet.sweep.progress import SweepProgress, describe, error_cause
from sacfleet.sweep.spec import SweepRefused, SweepSpec, open_sweep_dir, parse_grid, parse_seeds
from sacfleet.sweep.stats import TrialResult, aggregate, markdown
from sacfleet.sweep.trial import outcome_of

TINY = ["train.total_env_steps=1500", "train.learning_starts=500", "eval.interval=500", "eval.episodes=2",
        "eval.final_episodes=3", "learner.critic_warmup=0", "replay.samples_per_insert=8",
        "learner.hidden_sizes=[32, 32]"]


def sweep_command(run_dir: Path, *args: str, overrides=TINY) -> list[str]:
    return [sys.executable, "-m", "sacfleet", "sweep", "--run-dir", str(run_dir), *args,
            *[a for o in overrides for a in ("--set", o)]]


def run_sweep(run_dir: Path, *args: str, code: int, overrides=TINY) -> tuple[subprocess.CompletedProcess, dict]:
    """`sacfleet sweep` to its end, which must exit with `code`; its output and sweep.json."""
    proc = subprocess.run(sweep_command(run_dir, *args, overrides=overrides), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == code, proc.stdout + proc.stderr
    return proc, json.loads((run_dir / "sweep.json").read_text())


def assert_statistics_of(row: dict, x: np.ndarray, threshold: float) -> None:
    """A point's statistics equal numpy's and scipy's on its finals `x`."""
    assert row["mean"]["value"] == pytest.approx(x.mean())
    assert row["median"]["value"] == pytest.approx(np.median(x))
    assert row["iqm"]["value"] == pytest.approx(scipy_stats.trim_mean(x, 0.25))
    assert row["above_threshold"]["fraction"] == pytest.approx(np.mean(x > threshold))


def left_behind(run_dir: Path) -> list[str]:
    """Command lines of live processes that work in `run_dir` (the trials' `sacfleet train`)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(run_dir) in cmdline and int(proc.name) != os.getpid():
                found.append(cmdline)
    return found


# ------------------------------------------------------------------------------ without Ray

def test_seeds_and_grid_parse_and_bad_ones_are_named():
    assert parse_seeds("0-9") == tuple(range(10))
    assert parse_seeds("0,3,5") == (0, 3, 5)
    assert parse_seeds("0-2,7,1") == (0, 1, 2, 7)
    for bad in ("", "a", "3-1", "-1", "1,,2"):
        with pytest.raises(SweepRefused, match="--seeds"):
            parse_seeds(bad)
    assert parse_grid("learner.actor_lr=0.001,0.0003") == ("learner.actor_lr", ("0.001", "0.0003"))
    assert parse_grid("learner.hidden_sizes=[64, 64],[256,256]") == ("learner.hidden_sizes", ("[64, 64]", "[256,256]"))
    for bad in ("learner.actor_lr", "actor_lr=1,2", "learner.actor_lr=", "learner.actor_lr=1,1"):
        with pytest.raises(SweepRefused, match="--grid"):
            parse_grid(bad)


def test_grid_points_trials_and_refused_points():
    spec = SweepSpec("pointmass", (0, 1), [parse_grid("learner.actor_lr=0.001,0.01"),
                                           parse_grid("replay.sampler=uniform,bogus")], tuple(TINY))
    points = spec.points()
    assert [label for label, _ in points] == ["actor_lr=0.001,sampler=uniform", "actor_lr=0.001,sampler=bogus",
                                              "actor_lr=0.01,sampler=uniform", "actor_lr=0.01,sampler=bogus"]
    assert points[1][1] == ("learner.actor_lr=0.001", "replay.sampler=bogus")
    trials = spec.trials()
    assert len(trials) == 8 and [t.seed for t in trials[:4]] == [0] * 4  # seed-major
    assert spec.trial_overrides(trials[5])[-1] == "train.seed=1"
    refused = spec.check()  # the bogus points fail as trials; the sweep itself is not refused
    assert set(refused) == {"actor_lr=0.001,sampler=bogus", "actor_lr=0.01,sampler=bogus"}
    assert "uniform, prioritized" in refused["actor_lr=0.01,sampler=bogus"]
    with pytest.raises(ConfigError, match="learner.no_such_key"):  # every point refused: the sweep is
        SweepSpec("pointmass", (0,), [parse_grid("learner.no_such_key=1,2")]).check()
    with pytest.raises(ConfigError):
        SweepSpec("pointmass", (0,), overrides=("replay.sampler=bogus",)).check()


def test_a_sweep_directory_refuses_another_sweep_and_takes_more_seeds(tmp_path):
    spec = SweepSpec("pointmass", (0, 1), [parse_grid("learner.actor_lr=0.001,0.01")])
    assert open_sweep_dir(tmp_path / "s", spec) is False
    assert open_sweep_dir(tmp_path / "s", SweepSpec("pointmass", (0, 1, 2), spec.grid)) is True
    with pytest.raises(SweepRefused, match="holds another sweep.*grid"):
        open_sweep_dir(tmp_path / "s", SweepSpec("pointmass", (0, 1), [parse_grid("learner.actor_lr=0.1,0.01")]))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file").write_text("x")
    with pytest.raises(SweepRefused, match="not a sweep directory"):
        open_sweep_dir(tmp_path / "other", spec)


def test_statistics_match_a_direct_computation():
    rng = np.random.default_rng(3)
    finals = {"a": list(rng.normal(-5, 1, size=7)), "b": list(rng.normal(-4, 3, size=7)) + [-900.0]}
    results = [TrialResult(point, seed, "finished", {"final_eval": v, "wall_seconds": 10.0 + seed,
                                                     "updates_per_s": 100.0, "env_steps_per_s": 50.0})
               for point, values in finals.items() for seed, v in enumerate(values)]
    results.append(TrialResult("b", 99, "failed", {"cause": "diverged"}))
    report = aggregate(results, [("a", ()), ("b", ())], threshold=-6.0)
    for row in report["points"]:
        x = np.array(finals[row["point"]])
        assert row["finished"] == len(x)
        assert_statistics_of(row, x, -6.0)
        for name in ("mean", "median", "iqm"):
            low, high = row[name]["ci"]
            assert x.min() <= low <= row[name]["value"] <= high <= x.max()
        assert row["wall_seconds"] == pytest.approx(10.0 + (len(x) - 1) / 2)
    b = report["points"][1]
    assert b["failed"] == 1 and b["seeds"] == 9
    # One seed of b collapsed: its mean falls far below its IQM, which the outlier does not move much.
    assert b["mean"]["value"] < -100 < b["iqm"]["value"]
    a_vals, b_vals = np.array(finals["a"]), np.array(finals["b"])
    direct = np.mean([(bv > av) + 0.5 * (bv == av) for bv in b_vals for av in a_vals])
    poi = report["comparisons"][0]
    assert (poi["point"], poi["over"]) == ("b", "a")
    assert poi["probability_of_improvement"]["value"] == pytest.approx(direct)
    text = markdown({**report, "threshold": -6.0, "trials": []})
    assert "| b | 8 of 9 (1 failed) |" in text and "P(b > a)" in text


def test_a_run_outcome_says_finished_failed_or_interrupted():
    summary = {"interrupted": False, "failed": False, "env_steps": 10, "wall_seconds": 2.0, "health": {"status": "ok"},
               "eval": {"return_mean": -4.0, "curve": [[5, 1.0, -6.0]]}, "throughput": {"updates_per_s": 9.0}}
    done = outcome_of(summary, 0, [])
    assert done["status"] == "finished" and done["final_eval"] == -4.0 and done["updates_per_s"] == 9.0
    diverged = {**summary, "failed": True, "stop_reason": "learner diverged at update 2"}
    assert outcome_of(diverged, 1, []) == {"status": "failed", "cause": "learner diverged at update 2",
                                           "curve": [[5, 1.0, -6.0]]}
    said = outcome_of(None, 2, ["sacfleet train: replay.sampler: 'x' is not allowed"])
    assert said["cause"] == "replay.sampler: 'x' is not allowed"
    assert outcome_of(None, -9, ["starting", ""])["cause"] == "killed by SIGKILL; last line: starting"
    assert outcome_of({**summary, "interrupted": True}, 0, []) == {"status": "interrupted"}


def test_progress_lines_plain_and_in_place():
    class FakeTrial:
        def __init__(self, seed):
            self.trial_id, self.config, self.last_result = f"t{seed}", {"trial": {"point": "lr=1", "seed": seed}}, {}

        def get_error(self):
            return "Traceback ...\nsacfleet.sweep.trial.TrialFailed: learner diverged"

    plain = io.StringIO()
    view = SweepProgress(plain, tty=False)
    view.on_trial_start(0, [], FakeTrial(0))
    view.on_trial_result(0, [], FakeTrial(0), {"status": "running", "env_steps": 1000, "total_env_steps": 3000,
                                               "wall_seconds": 5.0, "updates_per_s": 80.0, "eval": -7.5})
    view.on_trial_result(0, [], FakeTrial(0), {"status": "running", "env_steps": 2000, "total_env_steps": 3000,
                                               "wall_seconds": 9.0, "updates_per_s": 80.0, "eval": -7.0})
    view.on_trial_error(0, [], FakeTrial(0))
    lines = plain.getvalue().splitlines()
    # At most one line per trial per PLAIN_EVERY_S: the second result is not printed; no escape codes.
    assert lines[0] == "lr=1 s0: started" and "1,000/3,000" in lines[1] and "-7.50" in lines[1]
    assert lines[2] == "lr=1 s0: FAILED: learner diverged" and len(lines) == 3 and "\x1b" not in plain.getvalue()
    assert "eta     4 s" in describe({"env_steps": 2000, "total_env_steps": 3000, "wall_seconds": 9.0},
                                     {"env_steps": 1000, "wall_seconds": 5.0})
    tty = io.StringIO()
    live = SweepProgress(tty, tty=True)
    live.on_trial_start(0, [], FakeTrial(1))
    live.on_trial_result(0, [], FakeTrial(1), {"status": "running", "env_steps": 500, "total_env_steps": 3000})
    live.on_trial_result(0, [], FakeTrial(1), {"status": "running", "env_steps": 900, "total_env_steps": 3000})
    # Each redraw moves up over the block and erases it before drawing it again.
    assert tty.getvalue().count("\x1b[1F\x1b[J") >= 2 and tty.getvalue().rstrip().endswith("updates/s")


# ------------------------------------------------------------------------------ on Ray Tune

def test_a_sweep_runs_its_trials_on_tune_and_aggregates_them(tmp_path):
    run_dir = tmp_path / "sweep"
    proc, report = run_sweep(run_dir, "--seeds", "0-2", "--grid", "learner.actor_lr=0.001,0.01", "--threshold",
                             "-300", code=0)
    assert report["complete"] and len(report["trials"]) == 6
    finals = {}
    for trial in report["trials"]:
        summary = json.loads((Path(trial["run_dir"]) / "summary.json").read_text())
        assert summary["config"]["train"]["seed"] == trial["seed"]
        assert summary["config"]["learner"]["actor_lr"] == float(trial["point"].split("=")[1])
        assert trial["final_eval"] == summary["eval"]["return_mean"]
        finals.setdefault(trial["point"], []).append(trial["final_eval"])
    for row in report["points"]:
        assert_statistics_of(row, np.array(finals[row["point"]]), -300)
    # Tune ran them: its experiment state, and a trial per (point, seed).
    sessions = list((run_dir / "tune").glob("session-*/experiment_state-*.json"))
    assert len(sessions) == 1
    assert proc.stdout.count(": started") == 6 and proc.stdout.count(": finished, final eval") == 6
    assert "| actor_lr=0.01 | 3 of 3 |" in proc.stdout and "P(actor_lr=0.01 > actor_lr=0.001)" in proc.stdout
    assert (run_dir / "sweep.md").read_text().strip() in proc.stdout
    assert (run_dir / "curves.png").stat().st_size > 10_000 and (run_dir / "compare.png").stat().st_size > 10_000
    assert not left_behind(run_dir)


def test_failed_trials_are_reported_with_their_cause_and_the_others_finish(tmp_path):
    run_dir = tmp_path / "sweep"
    grid = ("--seeds", "0", "--grid", "learner.critic_lr=0.001,1e12", "--grid", "replay.sampler=uniform,bogus")
    proc, report = run_sweep(run_dir, *grid, code=1)
    status = {t["point"]: t for t in report["trials"]}
    assert status["critic_lr=0.001,sampler=uniform"]["status"] == "finished"
    assert "learner diverged" in status["critic_lr=1e12,sampler=uniform"]["cause"]
    assert "'bogus' is not allowed" in status["critic_lr=0.001,sampler=bogus"]["cause"]
    assert "grid point critic_lr=0.001,sampler=bogus: refused" in proc.stdout
    assert "critic_lr=1e12,sampler=uniform s0: FAILED: learner diverged" in proc.stdout
    assert "1 of 4 trials finished, 3 failed" in proc.stdout
    # A rerun reads the failed trials' causes instead of running them again.
    again, _ = run_sweep(run_dir, *grid, code=1)
    assert "4 done before, 0 to run" in again.stdout and ": started" not in again.stdout


def test_an_interrupted_sweep_stops_its_trials_in_order_and_a_rerun_runs_only_the_rest(tmp_path):
    run_dir = tmp_path / "sweep"
    command = sweep_command(run_dir, "--seeds", "0-3", overrides=TINY + ["train.total_env_steps=5000",
                                                                       "replay.samples_per_insert=64"])
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    outcomes = run_dir / "trials" / "base"

    def early_in_a_run() -> Path | None:
        """A trial without an outcome that has logged a record before half its steps."""
        for trial in outcomes.glob("s?"):
            try:
                lines = (trial / "metrics.jsonl").read_text().splitlines()
                if not trial.with_suffix(".json").exists() and lines and json.loads(lines[-1])["env_steps"] <= 2500:
                    return trial
            except (OSError, ValueError):
                continue
        return None

    deadline = time.monotonic() + 300
    learning = None
    while time.monotonic() < deadline and proc.poll() is None:
        if list(outcomes.glob("s*.json")) and (learning := early_in_a_run()):
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # Ctrl-C, once a trial has finished and another has far to go
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out
    assert "SIGINT: stopping" in out and "rerun the same command to continue them" in out
    assert not left_behind(run_dir)
    finished = {p.stem for p in outcomes.glob("s*.json")}
    assert finished and len(finished) < 4, out
    # The trial that was learning was stopped as Ctrl-C stops a run: checkpoint and summary (one that
    # had only just started may have had nothing to save).
    assert learning is not None and learning.name not in finished, out
    assert json.loads((learning / "summary.json").read_text())["interrupted"] is True, out
    assert (learning / "checkpoints" / "checkpoint.pt").is_file()
    for seed in {"s0", "s1", "s2", "s3"} - finished:
        if (outcomes / seed).exists():
            assert f"base {seed}: stopped; rerunning the sweep continues it" in out
    mtimes = {seed: (outcomes / f"{seed}.json").stat().st_mtime_ns for seed in finished}

    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"{len(finished)} done before, {4 - len(finished)} to run" in again.stdout
    assert again.stdout.count(": started") == 4 - len(finished)
    assert {seed: (outcomes / f"{seed}.json").stat().st_mtime_ns for seed in finished} == mtimes
    assert json.loads((run_dir / "sweep.json").read_text())["points"][0]["finished"] == 4


def test_a_fleet_trial_runs_in_the_placement_group_tune_reserved(tmp_path):
    run_dir = tmp_path / "sweep"
    run_sweep(run_dir, "--fleet", "--seeds", "0", code=0, overrides=TINY + ["eval.interval=0", "learner.batch_size=64"])
    log = (run_dir / "trials" / "base" / "s0.log").read_text()
    # The trial's fleet was planned within the reservation's fleet bundle (2 CPUs less the driver's 0.1)
    # and every part was placed in that bundle.
    assert "--placement-group" in log and "reserved 1.9 CPUs" in log, log
    assert "placement: 127.0.0.1/" in log and "(1.9 CPU): learner, eval, shard 0, actors 0,1" in log, log
    summary = json.loads((run_dir / "trials" / "base" / "s0" / "summary.json").read_text())
    assert summary["mode"] == "fleet" and summary["resources"]["cluster_cpus"] == pytest.approx(1.9)
    # Each part, asked where it runs, is in the trial's placement group.
    reservation = summary["reservation"]
    assert reservation["bundle"] == 1 and f"--placement-group {reservation['placement_group']}:1" in log
    assert reservation["parts"] == {part: reservation["placement_group"]
                                    for part in ("learner", "eval", "shard 0", "actor 0", "actor 1")}
    assert "reservation: every part runs in placement group" in log
    assert not left_behind(run_dir)


def test_error_cause_is_what_the_trial_raised():
    trace = "Traceback (most recent call last):\n  ...\nsacfleet.sweep.trial.TrialFailed: exit 1; last line: x\n"
    assert error_cause(trace) == "exit 1; last line: x"
    assert error_cause("RuntimeError: boom") == "RuntimeError: boom"


def test_bad_sweep_and_reservation_input_is_refused_before_anything_starts(tmp_path, capsys):
    from sacfleet.cli import main

    def refused(*argv) -> str:
        assert main(list(argv)) == 2
        return capsys.readouterr().err

    assert "--seeds" in refused("sweep", "--seeds", "3-1", "--run-dir", str(tmp_path / "a"))
    assert "train.seed is what --seeds sets" in refused("sweep", "--grid", "train.seed=1,2", "--run-dir",
                                                        str(tmp_path / "a"))
    assert "a key given twice" in refused("sweep", "--grid", "learner.actor_lr=1,2", "--grid",
                                          "learner.actor_lr=3,4", "--run-dir", str(tmp_path / "a"))
    assert "learner.no_such_key" in refused("sweep", "--set", "learner.no_such_key=1", "--run-dir", str(tmp_path / "a"))
    assert "--concurrent" in refused("sweep", "--concurrent", "0", "--run-dir", str(tmp_path / "a"))
    assert not (tmp_path / "a").exists()  # nothing was written
    assert "give its --address" in refused("train", "--placement-group", "ab:1", "--run-dir", str(tmp_path / "b"))
    assert "PLACEMENT_GROUP_ID:BUNDLE_INDEX" in refused("train", "--placement-group", "zz", "--address", "127.0.0.1:1",
                                                        "--run-dir", str(tmp_path / "b"))
    assert not (tmp_path / "b").exists()


def test_trials_no_node_can_hold_are_refused_instead_of_waiting_forever(tmp_path):
    proc = subprocess.run(sweep_command(tmp_path / "sweep", "--seeds", "0", "--cpus-per-trial", "64"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--cpus-per-trial 64" in proc.stderr and "the largest node has" in proc.stderr
    assert not list((tmp_path / "sweep").glob("trials/*/*")) and not left_behind(tmp_path / "sweep")
