"""Longer learning runs, excluded from the default suite: `make test-slow`."""

import json
import subprocess
import sys

import pytest

from sacfleet.common.config import load_config
from sacfleet.driver.train_inline import train_inline

pytestmark = pytest.mark.slow


def test_pendulum_reaches_minus_200_in_20k_steps(tmp_path):
    cfg = load_config("pendulum", ["train.total_env_steps=20000", "train.seed=0"])
    summary = train_inline(cfg, tmp_path, echo=lambda line: None)
    assert summary["eval"]["return_mean"] >= -200, summary["eval"]


def test_every_seed_learns_the_point_mass_in_the_fleet(tmp_path):
    """Issue 24: `sacfleet train --config pointmass --set train.seed=S` (what `make run SEED=S` runs)
    ends at -10 or better over 100 episodes for each of seeds 0 to 9, with health ok (about 9 minutes)."""
    results = {}
    for seed in range(10):
        run_dir = tmp_path / f"seed{seed}"
        out = subprocess.run([sys.executable, "-m", "sacfleet", "train", "--config", "pointmass", "--set",
                              f"train.seed={seed}", "--run-dir", str(run_dir)],
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout + out.stderr
        summary = json.loads((run_dir / "summary.json").read_text())
        results[seed] = (round(summary["eval"]["return_mean"], 1), summary["health"]["status"])
    assert all(ret >= -10 and health == "ok" for ret, health in results.values()), results


def test_every_seed_learns_the_point_mass_in_process_and_stays_learned_to_30k_steps(tmp_path):
    """Issue 24: in-process seeds 0 to 9 trained to 30k steps (2.5 times the preset's budget) end at -10
    or better, and no evaluation after the first at -10 or better falls below -10 (about 12 minutes)."""
    results = {}
    for seed in range(10):
        cfg = load_config("pointmass", [f"train.seed={seed}", "train.total_env_steps=30000", "eval.interval=6000"])
        summary = train_inline(cfg, tmp_path / f"seed{seed}", echo=lambda line: None)
        curve = [round(point[2], 1) for point in summary["eval"]["curve"]]
        results[seed] = (curve, summary["health"]["status"])
    for seed, (curve, health) in results.items():
        learned = next((i for i, value in enumerate(curve) if value >= -10), len(curve))
        assert curve[-1] >= -10 and all(value >= -10 for value in curve[learned:]) and health == "ok", results


def test_crossq_learns_hopper_several_times_better_than_sac_at_100k_steps(tmp_path):
    """Issue 25: `sacfleet train --config hopper+fast` (CrossQ, 256-wide critics) in the fleet ends at
    2,000 or more over 10 episodes at 100k env steps, seed 0 (about 40 minutes on 2 cores). Measured:
    3,244; plain SAC's run of the same seed ended at 669, and the published SAC figure is 1,104."""
    run_dir = tmp_path / "hopper-fast"
    out = subprocess.run([sys.executable, "-m", "sacfleet", "train", "--config", "hopper+fast", "--set", "train.seed=0",
                          "--set", "train.total_env_steps=100000", "--set", "eval.interval=20000",
                          "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=4 * 3600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["eval"]["return_mean"] >= 2000, summary["eval"]
