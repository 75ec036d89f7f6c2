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
from sacfleet.bench import learner_suite
from sacfleet.bench.learner_suite import (ACT_DIM, OBS_DIM, FedUpdates, NaiveSAC, flops, matmul_shapes,
                                          random_batch, sample_answers)
from sacfleet.cli import main
from sacfleet.common.config import LearnerConfig
from sacfleet.learner import Batch, SACLearner
from sacfleet.learner.prefetch import to_device_block

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
    names = ("sacfleet", "naive", "sacfleet block 8", "sacfleet fed 8")
    modes = {(f"critic {mode}", 32) for mode in ("mlp", "layernorm", "crossq")}  # at the first batch size
    assert set(rates) == {(name, b) for name in names for b in (32, 64)} | modes  # no tf32 rows on CPU
    ratio = next(r for r in records if r["name"] == "critic crossq" and r["metric"] == "ratio_to_mlp")
    assert ratio["value"] == pytest.approx(rates[("critic crossq", 32)] / rates[("critic mlp", 32)])
    assert all(v > 0 for v in rates.values())
    fed = next(r for r in records if r["metric"] == "fraction_of_block" and r["batch_size"] == 64)
    assert fed["value"] == pytest.approx(rates[("sacfleet fed 8", 64)] / rates[("sacfleet block 8", 64)])
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


@pytest.mark.parametrize("inputs", [{}, {"obs_norm": True, "obs_clip": 5.0, "obs_symlog": True, "critic": "layernorm"},
                                    {"critic": "crossq", "policy_delay": 3, "adam_beta1": 0.5}])
def test_the_compiled_update_computes_the_same_losses_and_gradients_as_the_plain_one(inputs):
    """learner.compile=on (the CUDA default) checked on CPU: same start, same noise, a block of two updates;
    with the plain inputs, with observation statistics updated inside the step and LayerNorm critics, and
    with CrossQ (batch renormalization's statistics updated inside the step, the second update's policy
    delayed)."""
    import torch._inductor.config as inductor_config

    from sacfleet.learner import compiled

    with inductor_config.patch(fallback_random=True):  # eager's RNG, so the noise matches
        _compare_compiled_and_plain(compiled, inputs)


def _compare_compiled_and_plain(compiled, inputs):
    torch.manual_seed(0)
    batch = random_batch(128, OBS_DIM, ACT_DIM, torch.device("cpu"))
    learners = []
    for mode in ("off", "on"):
        torch.manual_seed(1)
        learner = SACLearner(OBS_DIM, ACT_DIM, -np.ones(ACT_DIM), np.ones(ACT_DIM), hidden_sizes=(32, 32), **inputs)
        learners.append(compiled.accelerate(learner) if mode == "on" else learner)
    plain, fast = learners
    assert not plain.compiled and fast.compiled
    block = Batch.stack([batch, random_batch(128, OBS_DIM, ACT_DIM, torch.device("cpu"), seed=1)])
    results = []
    for learner in learners:
        torch.manual_seed(2)
        td_error, values, _ = learner._block_step(block)  # two updates: the second starts from the first's result
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
    for a, b in zip([*fast.actor.buffers(), *fast.critic.buffers()], [*plain.actor.buffers(), *plain.critic.buffers()]):
        torch.testing.assert_close(a, b)


def _learner(seed=1, **kwargs):
    torch.manual_seed(seed)
    return SACLearner(OBS_DIM, ACT_DIM, -np.ones(ACT_DIM), np.ones(ACT_DIM), hidden_sizes=(32, 32), **kwargs)


def test_a_block_of_updates_is_exactly_the_same_updates_one_at_a_time():
    batches = [random_batch(64, OBS_DIM, ACT_DIM, torch.device("cpu"), seed=s) for s in range(3)]
    weights = torch.rand(3, 64)
    for batch, w in zip(batches, weights):
        batch.weights = w  # prioritized replay's importance weights travel in the block too
    one_at_a_time, in_a_block = _learner(), _learner()
    torch.manual_seed(5)
    td_each = torch.stack([one_at_a_time.update(batch) for batch in batches])
    torch.manual_seed(5)
    td_block = in_a_block.update_block(Batch.stack(batches))
    assert td_block.shape == (3, 64) and torch.equal(td_block, td_each)
    assert in_a_block.updates == one_at_a_time.updates == 3
    assert in_a_block.metrics.read() == one_at_a_time.metrics.read()  # means and maxima over the three
    for a, b in zip(in_a_block.state_dict()["critic"].values(), one_at_a_time.state_dict()["critic"].values()):
        assert torch.equal(a, b)
    assert torch.equal(in_a_block.log_alpha, one_at_a_time.log_alpha)


def test_a_block_on_the_device_holds_the_sampled_arrays_as_float32():
    answer = sample_answers(16, 3, count=1)[0]
    weights = np.random.default_rng(0).random((3, 16))
    block = to_device_block(answer["data"], weights, torch.device("cpu"))
    assert block.num_batches == 3
    for name, array in {**answer["data"], "weights": weights}.items():
        tensor = getattr(block, name)
        assert tensor.dtype == torch.float32 and tensor.is_contiguous() and tuple(tensor.shape) == array.shape
        assert torch.equal(tensor, torch.as_tensor(array.astype(np.float32)))
    assert set(block.terminated.unique().tolist()) <= {0.0, 1.0}
    # The block's fields share one buffer (one transfer to the device), and it is not the replay's memory.
    assert len({tensor.untyped_storage().data_ptr() for tensor in block.tensors().values()}) == 1
    block.obs.add_(1.0)
    assert not np.array_equal(block.obs.numpy(), answer["data"]["obs"])


def test_updates_fed_through_the_prefetcher_are_the_updates_on_the_sampled_blocks():
    fed_learner, direct = _learner(), _learner()
    fed = FedUpdates(fed_learner, 32, 2, torch.device("cpu"))
    try:
        torch.manual_seed(3)
        for _ in range(3):
            fed()
    finally:
        fed.close()
    answers = sample_answers(32, 2)  # FedUpdates hands out answers 1, 2, 3 of these, in order
    torch.manual_seed(3)
    for answer in answers[1:4]:
        direct.update_block(to_device_block(answer["data"], None, torch.device("cpu")))
    assert fed_learner.updates == direct.updates == 6
    assert fed.publisher.snapshots == 0  # no publish interval (10 updates) ended yet
    for a, b in zip(fed_learner.actor.parameters(), direct.actor.parameters()):
        assert torch.equal(a, b)


def test_the_suites_block_and_publish_interval_are_the_fleets_defaults():
    assert learner_suite.BLOCK == LearnerConfig().prefetch_batches
    assert learner_suite.PUBLISH_INTERVAL == LearnerConfig().publish_interval


def test_matmul_precision_is_set_for_the_process_and_checked():
    from sacfleet.learner.sac import matmul_precision, set_matmul_precision

    try:
        set_matmul_precision("tf32")
        assert matmul_precision() == "tf32"
        set_matmul_precision("float32")
        assert matmul_precision() == "float32"
        with pytest.raises(ValueError, match="learner.matmul_precision: 'bf16' is not allowed; choose one of: "
                                             "float32, tf32"):
            set_matmul_precision("bf16")
    finally:
        set_matmul_precision("float32")


def test_the_publisher_encodes_only_pulled_versions_from_copies_taken_at_the_snapshot():
    from sacfleet.common.codec import decode_weights
    from sacfleet.learner.publish import PolicyPublisher

    learner = _learner()
    publisher = PolicyPublisher(learner, interval=10)
    batches = [random_batch(32, OBS_DIM, ACT_DIM, torch.device("cpu"), seed=s) for s in range(4)]
    assert publisher.latest(-1) is None  # nothing published yet
    for batch in batches[:3]:
        learner.update(batch)
        publisher.snapshot()
    at_snapshot = {k: v.clone() for k, v in learner.actor.state_dict().items()}
    learner.update(batches[3])  # after the snapshot: not in what is pulled
    version, payload = publisher.latest(-1)
    assert version == 3 and publisher.snapshots == 3 and publisher.encodes == 1  # versions 1 and 2 never pulled
    weights, decoded_version = decode_weights(payload)
    assert decoded_version == 3
    for name, tensor in at_snapshot.items():
        np.testing.assert_array_equal(weights[name], tensor.numpy())
    assert publisher.latest(3) is None and publisher.encodes == 1 and publisher.pulls == 1
    assert publisher.latest(0)[0] == 3 and publisher.encodes == 1  # one encoding for every puller
    assert publisher.bytes_per_pull == len(payload)


def test_the_publisher_never_hands_out_a_policy_taken_after_the_learner_diverged():
    from sacfleet.learner.publish import PolicyPublisher
    from sacfleet.learner.sac import LearnerDiverged

    learner = _learner(reward_scale=1e38)
    publisher = PolicyPublisher(learner, interval=10)
    publisher.snapshot()
    assert publisher.latest(-1)[0] == 0 and not publisher.diverged()
    learner.update(random_batch(32, OBS_DIM, ACT_DIM, torch.device("cpu")))  # the critic target overflows
    publisher.snapshot()
    assert publisher.diverged()
    assert publisher.latest(0) is None  # actors keep version 0
    assert publisher.latest(-1)[0] == 0 and publisher.refused
    with pytest.raises(LearnerDiverged, match="at update 1"):
        learner.check_finite()


class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph on CPU: capture records the step it ran, replay runs that
    step again on the same (static) input tensors, writing into the captured outputs."""
    capturing = None

    def __init__(self):
        self.run = None

    def replay(self):
        self.run()


def _install_fake_cuda(monkeypatch) -> None:
    """torch.cuda's streams, synchronization and graphs replaced by CPU stand-ins (_FakeGraph)."""
    import contextlib

    @contextlib.contextmanager
    def graph(g, capture_error_mode="global"):
        assert capture_error_mode == "thread_local"  # the prefetch thread copies while this one captures
        _FakeGraph.capturing = g
        try:
            yield
        finally:
            _FakeGraph.capturing = None

    class Stream:
        def wait_stream(self, other):
            pass

    for name, value in (("Stream", Stream), ("stream", lambda s: contextlib.nullcontext()),
                        ("current_stream", Stream), ("synchronize", lambda: None), ("CUDAGraph", _FakeGraph),
                        ("graph", graph)):
        monkeypatch.setattr(torch.cuda, name, value)


def test_cuda_graph_step_warms_each_block_shape_then_replays_one_graph_per_shape(monkeypatch):
    """CudaGraphStep's bookkeeping, on CPU with a fake CUDA graph: every shape runs once uncaptured
    before its capture, each block's data is copied into its shape's static inputs, replays give
    the step's results, and outputs are copies that the next replay does not overwrite."""
    from sacfleet.learner import compiled

    calls = []

    def step(block):
        calls.append(tuple(block.obs.shape))
        out = (block.obs.sum(-1), block.reward.sum(-1, keepdim=True))
        if _FakeGraph.capturing is not None:  # replays recompute into the same output tensors
            def rerun(inputs=block, outputs=out):
                outputs[0].copy_(inputs.obs.sum(-1))
                outputs[1].copy_(inputs.reward.sum(-1, keepdim=True))
            _FakeGraph.capturing.run = rerun
        return out

    _install_fake_cuda(monkeypatch)

    def block(k, seed):
        g = torch.Generator().manual_seed(seed)
        return Batch(obs=torch.randn(k, 4, 3, generator=g), action=torch.zeros(k, 4, 2), reward=torch.randn(k, 4,
                     generator=g), next_obs=torch.zeros(k, 4, 3), terminated=torch.zeros(k, 4))

    runner = compiled.CudaGraphStep(step)
    for i in range(compiled.WARMUP_UPDATES):  # warm-up: uncaptured
        runner(block(8, i))
    assert len(calls) == compiled.WARMUP_UPDATES and not runner.graphs
    first = block(8, 10)
    out = runner(first)  # capture (the step runs once, as capture records it) and replay
    assert len(runner.graphs) == 1 and len(calls) == compiled.WARMUP_UPDATES + 1
    torch.testing.assert_close(out[0], first.obs.sum(-1))
    second = block(8, 11)
    out2 = runner(second)  # a replay: the step is not called again
    assert len(calls) == compiled.WARMUP_UPDATES + 1
    torch.testing.assert_close(out2[0], second.obs.sum(-1))
    torch.testing.assert_close(out[0], first.obs.sum(-1))  # the earlier outputs were copies
    small = block(3, 12)
    torch.testing.assert_close(runner(small)[0], small.obs.sum(-1))  # a new shape: uncaptured once
    assert len(runner.graphs) == 1 and calls[-1] == (3, 4, 3)
    torch.testing.assert_close(runner(block(3, 13))[0], block(3, 13).obs.sum(-1))  # then its own graph
    assert len(runner.graphs) == 2
    torch.testing.assert_close(runner(block(8, 14))[0], block(8, 14).obs.sum(-1))  # the first graph again
    assert len(calls) == compiled.WARMUP_UPDATES + 3


def test_cuda_graph_step_captures_one_graph_per_static_argument(monkeypatch):
    """The learner passes its place in the learner.policy_delay cycle as a static argument: each value
    is a capture of its own, and replays run the step that value selected."""
    from sacfleet.learner import compiled

    calls = []

    def step(block, phase):
        calls.append(phase)
        out = (block.obs.sum(-1) + phase,)
        if _FakeGraph.capturing is not None:
            def rerun(inputs=block, outputs=out, phase=phase):
                outputs[0].copy_(inputs.obs.sum(-1) + phase)
            _FakeGraph.capturing.run = rerun
        return out

    _install_fake_cuda(monkeypatch)

    def block(seed):
        g = torch.Generator().manual_seed(seed)
        return Batch(obs=torch.randn(2, 4, 3, generator=g), action=torch.zeros(2, 4, 2), reward=torch.zeros(2, 4),
                     next_obs=torch.zeros(2, 4, 3), terminated=torch.zeros(2, 4))

    runner = compiled.CudaGraphStep(step)
    for seed in range(40):
        phase = seed % 3
        b = block(seed)
        torch.testing.assert_close(runner(b, phase)[0], b.obs.sum(-1) + phase)
    assert sorted(key[1] for key in runner.graphs) == [(0,), (1,), (2,)]
    # Warm-up and one capture per phase ran the step; every later call was a replay.
    assert len(calls) < 12
