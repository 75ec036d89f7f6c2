"""The core imports without Ray, and the learner runs with only torch and numpy (DESIGN principle 1)."""

import subprocess
import sys

BLOCK = "import sys\nfor name in {names}:\n    sys.modules[name] = None\n"


def run_python(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_core_imports_without_ray():
    out = run_python(BLOCK.format(names=["ray"]) + "import sacfleet.learner, sacfleet.replay_server, sacfleet.common\n"
                     "import sacfleet.common.codec, sacfleet.common.config, sacfleet.common.envs\n")
    assert out.returncode == 0, out.stderr


def test_learner_updates_with_only_torch_and_numpy():
    code = BLOCK.format(names=["ray", "gymnasium", "yaml", "msgpack", "tensorboard", "mujoco"]) + """
import numpy as np, torch
from sacfleet.learner import Batch, SACLearner
learner = SACLearner(3, 2, np.array([-1, -1], np.float32), np.array([1, 1], np.float32), hidden_sizes=(16,))
batch = Batch(obs=torch.randn(8, 3), action=torch.zeros(8, 2), reward=torch.ones(8), next_obs=torch.randn(8, 3),
              terminated=torch.zeros(8))
learner.update(batch)
assert learner.updates == 1
"""
    out = run_python(code)
    assert out.returncode == 0, out.stderr
