"""The learner benchmark and the fast learner: the suite runs with torch and numpy only, its FLOP
count matches torch's, the naive reference is a working SAC update, and the compiled update
computes what the plain one does."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sacfleet.bench import SUITES
from sacfleet.bench.learner_suite import ACT_DIM, OBS_DIM, NaiveSAC, flops, matmul_shapes, random_batch
from sacfleet.cli import main
from sacfleet.learner import SACLearner

BLOCK = "import sys\nfor name in {names}:\n    sys.modules[name] = None\n"
KEYS = ["suite", "name", "device", "batch_size", "actors", "metric", "value", "unit"]


def test_bench_learner_json_runs_with_only_torch_and_numpy(tmp_path):
    code = BLOCK.format(names=["ray", "gymnasium", "mujoco", "yaml", "msgpack", "tensorboard", "matplotlib"]) + (
        "from sacfleet.cli import main\n"
        f"sys.exit(main(['bench', 'learner', '--json', '--batch-sizes', '32,64', '--seconds', '0.2', "
        f"'--out', {str(tmp_path)!r}]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    records = json.loads(out.stdout)  # stdout holds the JSON alone; progress went to stderr
    assert all(list(r) == KEYS for r in records)
    rates = {(r["name"], r["batch_size"]): r["value"] for r in records if r["metric"] == "updates_per_s"}
    assert set(rates) == {("sacfleet", 32), ("sacfleet", 64), ("naive", 32), ("naive", 64)}
    assert all(v > 0 for v in rates.values())
    assert {r["suite"] for r in records} == {"learner"} and all(r["actors"] is None for r in records)
    speedup = next(r for r in records if r["metric"] == "speedup_vs_naive" and r["batch_size"] == 32)
    assert speedup["value"] == pytest.approx(rates[("sacfleet", 32)] / rates[("naive", 32)])
    assert "no plots: matplotlib is not installed" in out.stderr
    assert json.loads((tmp_path / "records.json").read_text()) == records


def test_bench_rejects_an_unknown_suite(capsys):
    assert main(["bench", "learnr"]) == 2
    assert f"unknown suite 'learnr'; choose from: {', '.join(SUITES)}" in capsys.readouterr().err


@pytest.mark.parametrize("batch_size", [64, 256])
def test_matmul_shapes_count_the_flops_torch_counts_in_one_update(batch_size):
    hidden = (64, 32)
    learner = SACLearner(OBS_DIM, ACT_DIM, -np.ones(ACT_DIM), np.ones(ACT_DIM), hidden_sizes=hidden)
    batch = random_batch(batch_size, OBS_DIM, ACT_DIM, torch.device("cpu"))
    with FlopCounterMode(display=False) as counter:
        learner.update(batch)
    # Torch counts matmuls only; the critics' one-column output layer is a multiply-and-sum in
    # ours, a few hundred FLOPs per sample that our count includes and torch's does not.
    ours = flops(matmul_shapes(batch_size, OBS_DIM, ACT_DIM, hidden))
    assert counter.get_total_flops() == pytest.approx(ours, rel=0.01)


def test_the_naive_reference_is_a_working_sac_update():
    torch.manual_seed(0)
    naive = NaiveSAC(OBS_DIM, ACT_DIM, (32, 32), torch.device("cpu"))
    batch = random_batch(64, OBS_DIM, ACT_DIM, torch.device("cpu"))
    before = [p.detach().clone() for p in [*naive.q1.parameters(), *naive.trunk.parameters()]]
    first = naive.update(batch)
    for _ in range(50):
        last = naive.update(batch)
    after = [*naive.q1.parameters(), *naive.trunk.parameters()]
    assert all(np.isfinite(v) for v in last.values())
    assert all(not torch.equal(b, a) for b, a in zip(before, after))
    assert last["critic_loss"] < first["critic_loss"]  # fitting one fixed batch


def test_the_compiled_update_computes_the_same_losses_and_gradients_as_the_plain_one(monkeypatch):
    """learner.compile=on (the CUDA default) checked on CPU: same start, same noise, one update."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "fallback_random", True)  # eager's RNG, so the noise matches
    torch.manual_seed(0)
    batch = random_batch(128, OBS_DIM, ACT_DIM, torch.device("cpu"))
    learners = []
    for mode in ("off", "on"):
        torch.manual_seed(1)
        learners.append(SACLearner(OBS_DIM, ACT_DIM, -np.ones(ACT_DIM), np.ones(ACT_DIM), hidden_sizes=(32, 32),
                                   compile=mode))
    plain, fast = learners
    assert not plain.compiled and fast.compiled
    results = []
    for learner in learners:
        torch.manual_seed(2)
        td_error, values = learner._step(batch)
        grads = [p.grad.clone() for p in [*learner.critic.parameters(), *learner.actor.parameters()]]
        results.append((td_error, values, grads))
    (td0, v0, g0), (td1, v1, g1) = results
    torch.testing.assert_close(v1, v0, rtol=1e-4, atol=1e-5)   # critic, actor and alpha losses, entropy, Q
    torch.testing.assert_close(td1, td0, rtol=1e-4, atol=1e-5)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip([*fast.critic.parameters(), *fast.actor.parameters(), fast.log_alpha],
                    [*plain.critic.parameters(), *plain.actor.parameters(), plain.log_alpha]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
