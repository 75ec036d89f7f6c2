"""The actors and e2e bench suites on a real local Ray (short runs on the point mass), the numpy
policy actors act with, and the bench plots."""

import json
import time

import numpy as np
import pytest
import ray
import torch

from sacfleet.actors.policy import NumpyPolicy
from sacfleet.bench import Record, actors_suite, e2e_suite, suite_module
from sacfleet.bench.report import write_outputs
from sacfleet.common.codec import decode_weights, encode_weights
from sacfleet.common.envs import POINTMASS_ID
from sacfleet.learner.networks import BatchRenorm, PolicyNetwork, evaluating


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def _policy(obs_dim=5, act_dim=3, obs_clip=None, renorm=False):
    torch.manual_seed(0)
    actor = PolicyNetwork(obs_dim, act_dim, [16, 8], np.array([-1.0, 0.0, -3.0]), np.array([1.0, 2.0, 1.0]), obs_clip,
                          renorm={"momentum": 0.5, "warmup": 0} if renorm else None)
    if renorm:
        # Running statistics and affine parameters far from the identity, as training leaves them.
        with torch.no_grad():
            for _ in range(5):
                actor(torch.randn(32, obs_dim) * 4 + 2)
            for module in actor.modules():
                if isinstance(module, BatchRenorm):
                    module.weight.uniform_(0.5, 2.0)
                    module.bias.uniform_(-1.0, 1.0)
    weights, _ = decode_weights(encode_weights({k: v.numpy() for k, v in actor.state_dict().items()}, 0))
    return actor, NumpyPolicy(weights)


@pytest.mark.parametrize("obs_clip,renorm", [(None, False), (0.5, False), (None, True)])
def test_acting_policy_is_the_learners_actor_in_numpy(obs_clip, renorm):
    """The same function as the torch policy in eval mode, batch renormalization (CrossQ) included."""
    actor, policy = _policy(obs_clip=obs_clip, renorm=renorm)
    obs = np.random.default_rng(1).normal(size=(7, 5)).astype(np.float32) * 3
    with torch.no_grad(), evaluating(actor):
        expected = actor.deterministic(torch.as_tensor(obs)).numpy()
        mean, log_std = actor(torch.as_tensor(obs))
    np.testing.assert_allclose(policy(obs, deterministic=True), expected, rtol=1e-5, atol=1e-5)
    # Stochastic: the same noise through PolicyNetwork.sample's formula.
    noise = np.random.default_rng(2).standard_normal((7, 3), dtype=np.float32)
    with torch.no_grad():
        u = mean + log_std.exp() * torch.as_tensor(noise)
        expected = (torch.tanh(u) * actor.action_scale + actor.action_bias).numpy()
    np.testing.assert_allclose(policy(obs, np.random.default_rng(2)), expected, rtol=1e-5, atol=1e-5)
    action = policy(obs, np.random.default_rng(3))
    assert action.dtype == np.float32 and action.shape == (7, 3)
    assert (action >= [-1, 0, -3]).all() and (action <= [1, 2, 1]).all()
    if renorm:  # and act() is eval mode too: it neither uses nor changes batch statistics
        stats = {k: v.clone() for k, v in actor.state_dict().items()}
        np.testing.assert_allclose(actor.act(obs, deterministic=True), policy(obs, deterministic=True),
                                   rtol=1e-5, atol=1e-5)
        assert all(torch.equal(v, stats[k]) for k, v in actor.state_dict().items())


@pytest.mark.parametrize("obs_norm,renorm", [(False, False), (True, False), (True, True)])
def test_the_numpy_policy_reads_every_layer_the_policy_network_has(obs_norm, renorm):
    network = PolicyNetwork(4, 2, [16, 8, 8], np.array([-1.0, -1.0]), np.array([1.0, 1.0]), obs_norm=obs_norm,
                            renorm={} if renorm else None)
    state = network.state_dict()
    layers = PolicyNetwork.trunk_layers(state)
    # Three hidden layers and the output; with batch renormalization, one before each of them.
    assert [kind for kind, _ in layers] == ["renorm", "linear"] * 4 if renorm else ["linear"] * 4
    buffers = {PolicyNetwork.OBS_CLIP, PolicyNetwork.OBS_SYMLOG, PolicyNetwork.ACTION_SCALE, PolicyNetwork.ACTION_BIAS}
    if obs_norm:  # the observation statistics, which the numpy policy applies too
        buffers |= {PolicyNetwork.norm_key(name) for name in ("count", "mean", "var")}
    read = {f"{name}.{key}" for kind, name in layers
            for key in (("weight", "bias") if kind == "linear" else ("weight", "bias", "running_mean", "running_var"))}
    steps = {f"{name}.steps" for kind, name in layers if kind == "renorm"}  # training's count, not the function
    assert read | buffers | steps == set(state)
    policy = NumpyPolicy({k: v.numpy() for k, v in state.items()})
    assert len(policy.layers) == len(layers) and (policy.obs_shift is not None) == obs_norm


def test_acting_policy_rejects_weights_without_layers():
    with pytest.raises(ValueError, match="no trunk layers"):
        NumpyPolicy({"obs_clip": np.array(1.0)})


def test_actor_counts_double_up_to_the_cores():
    assert actors_suite.actor_counts(1) == (1,)
    assert actors_suite.actor_counts(2) == (1, 2)
    assert actors_suite.actor_counts(6) == (1, 2, 4)


def test_actors_suite_measures_what_a_weight_pull_costs(local_ray):
    pull = actors_suite.weight_pull_cost(pulls=30)
    # The halfcheetah preset's policy: 17 -> 256 -> 256 -> 12 in float32, and the codec's framing.
    assert 4 * (17 * 256 + 256 * 256 + 256 * 12) < pull["bytes"] < 4 * (17 * 256 + 256 * 256 + 256 * 12) + 4096
    assert set(pull["best"]) == {"nothing new", "weights"}
    assert all(per_call > 0 and cpu >= 0 for per_call, cpu in pull["best"].values())
    deadline = time.monotonic() + 30  # both stand-ins are gone: their CPUs are free again
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]


def test_actors_suite_measures_collection_with_the_policy(local_ray):
    figures = actors_suite.collect_rate(POINTMASS_ID, num_actors=1, settings=(4, 10, 10), seconds=0.3)
    assert figures["env_steps_per_s"] > 100
    shares = [figures[f"{stage}_share"] for stage in ("env", "inference", "insert_wait")]
    assert all(0 <= share <= 1 for share in shares) and sum(shares) <= 1.05
    assert figures["inference_share"] > 0  # the policy acted: weights arrived before measuring
    # Every actor it started is gone: their CPUs are free again.
    deadline = time.monotonic() + 20
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 2


def test_e2e_suite_reports_the_whole_fleet(local_ray, tmp_path):
    records = e2e_suite.run(actors=(1,), config="pointmass", wall_seconds=14, echo=lambda line: None)
    by_metric = {r.metric: r for r in records}
    assert all(r.suite == "e2e" and r.actors == 1 and r.device == "cpu" for r in records)
    assert by_metric["env_steps_per_s"].value > 20 and by_metric["updates_per_s"].value > 20
    # The rate limiter holds one update per env step (pointmass: 256 samples per insert, batch 256).
    assert by_metric["updates_per_env_step: target"].value == 1
    assert by_metric["updates_per_env_step: held"].value == pytest.approx(1, abs=0.1)
    assert by_metric["policy_lag"].value >= 0
    stages = {r.metric for r in records if r.metric.startswith("seconds: ")}
    assert {"seconds: learner: SAC updates", "seconds: actors: env step"} <= stages
    assert by_metric["seconds: learner: SAC updates"].value > 0
    # The learner suite ran here on the fleet learner's device, shapes and threads, and the fleet's
    # rate is reported as a fraction of it.
    suite = by_metric["learner suite updates_per_s"].value
    assert suite > 0 and by_metric["learner suite updates_per_s: blocks"].value > 0
    assert by_metric["updates_per_s: fraction of learner suite"].value == pytest.approx(
        by_metric["updates_per_s"].value / suite)
    assert by_metric["updates_per_s: fraction of learner suite blocks"].value > 0
    assert {p.name for p in write_outputs(records, tmp_path, "header")} == {"records.json", "table.txt", "e2e.png"}


def test_steady_rates_leave_out_the_warm_up(tmp_path):
    rows = [{"env_steps": 1000, "wall_seconds": 5.0, "train/n_updates": 0},
            {"env_steps": 1500, "wall_seconds": 8.0, "train/n_updates": 200},
            {"env_steps": 2500, "wall_seconds": 12.0, "train/n_updates": 1200}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert e2e_suite.steady_rates(path) == (250.0, 250.0)
    path.write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(RuntimeError, match="raise --seconds"):
        e2e_suite.steady_rates(path)


TINY = {"env": dict(env_ids=(POINTMASS_ID,)),
        "actors": dict(env_id=POINTMASS_ID, settings=[(2, 10, 10)], actors=(1,)),
        "replay": dict(capacities=(2000,), samplers=("uniform",), snapshot_capacity=20_000, goal_capacity=5000),
        "learner": dict(batch_sizes=(32,), devices=["cpu"])}


@pytest.mark.parametrize("suite", sorted(TINY))
def test_each_suite_runs_through_its_table_records_and_plot(local_ray, tmp_path, suite):
    """With tiny settings; the e2e suite's records go through them in test_e2e_suite_reports_the_whole_fleet."""
    records = suite_module(suite).run(seconds=0.05, echo=lambda line: None, **TINY[suite])
    assert records and {r.suite for r in records} == {suite}
    written = write_outputs(records, tmp_path, "header")
    assert {p.name for p in written} == {"records.json", "table.txt", f"{suite}.png"}
    assert all(p.stat().st_size > 0 for p in written)
    assert len(json.loads((tmp_path / "records.json").read_text())) == len(records)


def test_bench_outputs_a_plot_per_suite(tmp_path):
    pytest.importorskip("matplotlib")
    records = [Record(suite="actors", name="x 8 envs", metric="env_steps_per_s", value=v * 1000.0, unit="steps/s",
                      actors=n, batch_size=8) for n, v in ((1, 5), (2, 9))]
    records += [Record(suite="e2e", name="pm", metric=f"seconds: {stage}", value=1.0, unit="s", actors=1)
                for stage in ("a", "b")]
    written = write_outputs(records, tmp_path, "header")
    assert {p.name for p in written} == {"records.json", "table.txt", "actors.png", "e2e.png"}
    assert all(p.stat().st_size > 0 for p in written)
