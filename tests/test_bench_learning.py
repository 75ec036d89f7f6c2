"""`sacfleet bench learning`: trials of presets x variants x seeds, each a real training run (tiny here),
the table and curves it writes, and a rerun that reads finished trials instead of training again."""

import json

import pytest

from sacfleet.bench import learning
from sacfleet.cli import main
from sacfleet.common.config import ConfigError

TINY = ["train.learning_starts=200", "train.log_interval=300", "learner.hidden_sizes=[16, 16]",
        "learner.batch_size=32", "eval.episodes=2", "eval.final_episodes=2", "learner.num_threads=1",
        "learner.critic_warmup=0", "checkpoint.best=false", "learner.symlog_q=false"]


def test_variants_load_over_their_preset_and_unknown_ones_are_named():
    from sacfleet.common.config import load_config

    cfg = load_config("hopper+fast")
    assert cfg.env.id == "Hopper-v5" and cfg.learner.critic == "crossq"
    assert cfg.learner.critic_hidden_sizes == [256, 256] and cfg.learner.policy_delay == 3
    assert cfg.learner.batch_size == 256 and cfg.train.learning_starts == 10_000  # the preset's, kept
    with pytest.raises(ConfigError, match="'slow' is not a variant; choose from: fast, wide"):
        load_config("hopper+slow")


def test_bench_learning_trains_each_trial_writes_the_table_and_reads_finished_trials(tmp_path, capsys):
    args = ["bench", "learning", "--presets", "pointmass", "--variants", "sac,fast", "--seeds", "0",
            "--steps", "600", "--inline", "--out", str(tmp_path)]
    for override in TINY:
        args += ["--set", override]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "pointmass-sac seed 0: training to 600 env steps" in out
    table = (tmp_path / "table.md").read_text()
    assert "| pointmass | sac | 0 |" in table and "| pointmass | fast | 1 |" in table
    records = json.loads((tmp_path / "records.json").read_text())
    finals = {r["name"]: r["value"] for r in records if r["metric"] == "final_eval"}
    assert set(finals) == {"pointmass seed 0", "pointmass+fast seed 0"}
    summary = json.loads((tmp_path / "pointmass-fast" / "s0" / "summary.json").read_text())
    assert summary["config"]["learner"]["critic"] == "crossq" and summary["env_steps"] >= 600
    assert finals["pointmass+fast seed 0"] == summary["eval"]["return_mean"]
    assert (tmp_path / "curves.png").is_file()
    # Again: both trials are read, none trained; the table is the same.
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("finished before, read from") == 2 and "training to" not in out
    assert (tmp_path / "table.md").read_text() == table
    # A finished trial with other settings is refused, not mixed in.
    assert main([*args, "--set", "learner.gamma=0.9"]) == 2
    assert "holds a finished run with other settings (learner.gamma)" in capsys.readouterr().err


def test_bench_learning_refuses_bad_names_before_training(tmp_path, capsys):
    assert main(["bench", "learning", "--presets", "hoper", "--out", str(tmp_path)]) == 2
    assert "'hoper' is neither a preset" in capsys.readouterr().err
    assert main(["bench", "learning", "--variants", "sac,slow", "--out", str(tmp_path)]) == 2
    assert "'slow' is not a variant" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    with pytest.raises(ConfigError):
        learning.plan(["hopper"], ["sac"], [0], 1000, ["learner.critic=droq"])


def test_killing_the_benchmark_stops_the_run_it_started(tmp_path):
    """SIGKILL of `sacfleet bench learning` leaves no training process behind."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from sacfleet.common.reaper import descendants

    command = [sys.executable, "-m", "sacfleet", "bench", "learning", "--presets", "pointmass", "--variants", "sac",
               "--seeds", "0", "--steps", "1000000", "--inline", "--out", str(tmp_path)]
    for override in TINY:
        command += ["--set", override]
    bench = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        trainers = {}
        while time.monotonic() < deadline and not trainers:
            trainers = {pid for pid in descendants(bench.pid) if b"\0train\0" in _cmdline(pid)}
            time.sleep(0.2)
        assert trainers, "the benchmark started no training run"
        while not (tmp_path / "pointmass-sac" / "s0" / "metrics.jsonl").is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        os.kill(bench.pid, signal.SIGKILL)
        bench.wait(timeout=10)
        deadline = time.monotonic() + 30
        alive = trainers
        while alive and time.monotonic() < deadline:
            alive = {pid for pid in alive if os.path.exists(f"/proc/{pid}") and
                     open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] != "Z"}
            time.sleep(0.2)
        assert not alive, f"training processes {sorted(alive)} outlived the benchmark"
    finally:
        if bench.poll() is None:
            bench.kill()


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read()
    except OSError:
        return b""
