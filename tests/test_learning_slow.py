"""Longer learning runs, excluded from the default suite: `make test-slow`."""

import pytest

from sacfleet.common.config import load_config
from sacfleet.inline import train_inline

pytestmark = pytest.mark.slow


def test_pendulum_reaches_minus_200_in_20k_steps(tmp_path):
    cfg = load_config("pendulum", ["train.total_env_steps=20000", "train.seed=0"])
    summary = train_inline(cfg, tmp_path, echo=lambda line: None)
    assert summary["eval"]["return_mean"] >= -200, summary["eval"]


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5, 6, 7])
def test_point_mass_preset_on_other_seeds(tmp_path, seed):
    cfg = load_config("pointmass", [f"train.seed={seed}"])
    summary = train_inline(cfg, tmp_path, echo=lambda line: None)
    assert summary["eval"]["return_mean"] >= -100, summary["eval"]
