"""Observation normalization (learner.obs_norm), symlog inputs (learner.obs_symlog) and the critic
warm-up (learner.critic_warmup): the statistics are numpy's over the data the learner trained on,
every network and every acting policy sees the same inputs, and the statistics survive publishing,
checkpoints and resumes."""

import copy
import math

import numpy as np
import pytest
import torch

from sacfleet.actors.policy import NumpyPolicy
from sacfleet.common.codec import decode_weights, encode_weights
from sacfleet.learner import Batch, PolicyNetwork, SACLearner

LOW, HIGH = np.array([-2.0, -1.0], np.float32), np.array([2.0, 3.0], np.float32)


def _learner(**kw):
    torch.manual_seed(0)
    return SACLearner(3, 2, LOW, HIGH, hidden_sizes=(16, 16), **kw)


def _batch(rng, n=64, scale=(1.0, 0.01, 100.0), shift=(0.0, 5.0, -300.0)):
    obs = (rng.normal(size=(n, 3)) * scale + shift).astype(np.float32)
    return Batch.from_numpy({"obs": obs, "action": rng.uniform(LOW, HIGH, (n, 2)).astype(np.float32),
                             "reward": rng.normal(size=n).astype(np.float32),
                             "next_obs": (obs + rng.normal(size=(n, 3))).astype(np.float32),
                             "terminated": np.zeros(n, np.float32)}, None, "cpu")


def _weights(learner):
    """The policy as an env actor receives it: through the codec."""
    weights, _ = decode_weights(encode_weights(learner.policy_weights(), learner.updates))
    return weights


def test_the_statistics_are_numpys_mean_and_variance_of_the_observations_trained_on():
    learner, rng = _learner(obs_norm=True), np.random.default_rng(0)
    batches = [_batch(rng, n) for n in (64, 1, 200, 37)]
    for batch in batches:
        learner.update(batch)
    seen = np.concatenate([batch.obs.numpy() for batch in batches]).astype(np.float64)
    norm = learner.obs_norm
    assert norm.count.item() == len(seen)
    np.testing.assert_allclose(norm.mean.numpy(), seen.mean(0), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(norm.var.numpy(), seen.var(0), rtol=1e-9)
    # A block of updates merges its batches one by one, as single updates do.
    block = [_batch(rng) for _ in range(3)]
    blocked, single = _learner(obs_norm=True), _learner(obs_norm=True)
    blocked.update_block(Batch.stack(block))
    for batch in block:
        single.update(batch)
    for name in ("count", "mean", "var"):
        torch.testing.assert_close(getattr(blocked.obs_norm, name), getattr(single.obs_norm, name))


def test_all_networks_share_one_set_of_statistics_and_see_standardized_inputs():
    learner, rng = _learner(obs_norm=True), np.random.default_rng(0)
    learner.update(_batch(rng, 512))
    assert learner.actor.obs_norm is learner.obs_norm
    assert learner.critic.obs_norm is learner.obs_norm and learner.target_critic.obs_norm is learner.obs_norm
    # Standardized: a network sees the same input for raw observations a mean away and a std apart.
    norm = learner.obs_norm
    obs = torch.tensor([[1.0, 2.0, 3.0]])
    expected = (obs - norm.mean.float()) / (norm.var.float() + 1e-8).sqrt()
    torch.testing.assert_close(norm(obs), expected)


@pytest.mark.parametrize("options", [{"obs_norm": True}, {"obs_norm": True, "obs_clip": 2.0},
                                     {"obs_symlog": True}, {"obs_norm": True, "obs_symlog": True, "obs_clip": 5.0}])
def test_learner_numpy_actor_and_eval_policy_act_the_same(options):
    """The same observation and statistics give the same action in the learner, in an env actor's
    numpy policy and in an eval actor's network (built from the config, loaded from the weights)."""
    learner, rng = _learner(**options), np.random.default_rng(0)
    for _ in range(5):
        learner.update(_batch(rng))
    obs = np.concatenate([_batch(rng, 16).obs.numpy(), np.array([[1e4, -1e4, 0.0]], np.float32)])
    weights = _weights(learner)
    expected = learner.actor.act(obs, deterministic=True)
    np.testing.assert_allclose(NumpyPolicy(weights)(obs, deterministic=True), expected, rtol=1e-5, atol=1e-5)
    evaluator = PolicyNetwork(3, 2, (16, 16), LOW, HIGH, obs_norm=options.get("obs_norm", False),
                              obs_symlog=options.get("obs_symlog", False))
    evaluator.load_state_dict({name: torch.as_tensor(np.array(value)) for name, value in weights.items()})
    np.testing.assert_allclose(evaluator.act(obs, deterministic=True), expected, rtol=1e-6)
    # An eval network built without the option reads symlog from the weights too.
    if not options.get("obs_norm"):
        plain = PolicyNetwork(3, 2, (16, 16), LOW, HIGH)
        plain.load_state_dict({name: torch.as_tensor(np.array(value)) for name, value in weights.items()})
        np.testing.assert_allclose(plain.act(obs, deterministic=True), expected, rtol=1e-6)


def test_the_statistics_change_what_the_policy_does_and_travel_with_each_published_version():
    learner, rng = _learner(obs_norm=True), np.random.default_rng(0)
    learner.update(_batch(rng))
    first = _weights(learner)
    learner.update(_batch(rng, shift=(50.0, -5.0, 0.0)))
    second = _weights(learner)
    key = PolicyNetwork.norm_key("mean")
    assert not np.allclose(first[key], second[key])
    obs = np.zeros((1, 3), np.float32)
    # Same trunk, other statistics: another action.
    mixed = {**second, **{k: v for k, v in first.items() if k.startswith(PolicyNetwork.OBS_NORM)}}
    assert not np.allclose(NumpyPolicy(mixed)(obs, deterministic=True), NumpyPolicy(second)(obs, deterministic=True))


def test_a_checkpoint_restores_the_statistics_exactly_and_the_run_continues_identically():
    a, rng = _learner(obs_norm=True, obs_symlog=True), np.random.default_rng(0)
    for _ in range(3):
        a.update(_batch(rng))
    state = copy.deepcopy(a.state_dict())
    b = _learner(obs_norm=True, obs_symlog=True)
    b.load_state_dict(state)
    for name in ("count", "mean", "var"):
        assert torch.equal(getattr(b.obs_norm, name), getattr(a.obs_norm, name))
    assert b.target_critic.obs_norm is b.obs_norm and b.critic.obs_norm is b.obs_norm
    batch = _batch(rng)
    torch.manual_seed(7)
    a.update(batch)
    torch.manual_seed(7)
    b.update(batch)
    for key, value in a.actor.state_dict().items():
        torch.testing.assert_close(b.actor.state_dict()[key], value)


def test_an_old_checkpoint_without_the_new_keys_loads_with_them_off():
    a = _learner()
    a.update(_batch(np.random.default_rng(0)))
    state = copy.deepcopy(a.state_dict())
    for key in ("actor", "critic", "target_critic"):
        state[key].pop(PolicyNetwork.OBS_SYMLOG, None)
    b = _learner()
    b.load_state_dict(state)
    old_policy = {k: v for k, v in a.policy_weights().items() if k != PolicyNetwork.OBS_SYMLOG}
    evaluator = PolicyNetwork(3, 2, (16, 16), LOW, HIGH)
    evaluator.load_state_dict({k: torch.as_tensor(np.array(v)) for k, v in old_policy.items()})
    obs = np.ones((2, 3), np.float32)
    np.testing.assert_allclose(evaluator.act(obs, deterministic=True), a.actor.act(obs, deterministic=True))
    np.testing.assert_allclose(NumpyPolicy(old_policy)(obs, deterministic=True), a.actor.act(obs, deterministic=True),
                               rtol=1e-5, atol=1e-6)


def test_symlog_inputs_are_what_the_networks_see():
    """With obs_symlog a network computes on symlog(obs): inputs far from the data grow logarithmically."""
    symlogged, plain = _learner(obs_symlog=True), _learner()
    obs = torch.tensor([[1e6, -3.0, 0.5], [0.0, 1.0, -1e3]])
    squashed = torch.sign(obs) * torch.log1p(obs.abs())
    torch.testing.assert_close(symlogged.actor(obs)[0], plain.actor(squashed)[0])
    action = torch.zeros(2, 2)
    torch.testing.assert_close(symlogged.critic(obs, action), plain.critic(squashed, action))


def test_the_critic_warmup_trains_only_the_critics_and_publishes_no_policy_until_it_ends():
    learner, rng = _learner(critic_warmup=3), np.random.default_rng(0)
    actor, alpha = copy.deepcopy(learner.actor.state_dict()), learner.log_alpha.item()
    critic = copy.deepcopy(learner.critic.state_dict())
    for _ in range(3):
        assert not learner.policy_ready
        learner.update(_batch(rng))
    assert learner.policy_ready
    for key, value in learner.actor.state_dict().items():
        assert torch.equal(value, actor[key]), key
    assert learner.log_alpha.item() == alpha
    assert any(not torch.equal(value, critic[key]) for key, value in learner.critic.state_dict().items())
    metrics = learner.metrics.read()
    # No update trained the policy: its losses are not reported (not as zeros), the entropy is.
    assert "train/actor_loss" not in metrics and "train/ent_coef_loss" not in metrics
    assert metrics["train/critic_loss"] > 0.0 and math.isfinite(metrics["train/entropy"])
    learner.update(_batch(rng))
    assert any(not torch.equal(value, actor[key]) for key, value in learner.actor.state_dict().items())


def test_the_publisher_publishes_nothing_during_the_warmup():
    from sacfleet.learner.publish import PolicyPublisher

    learner, rng = _learner(critic_warmup=20), np.random.default_rng(0)
    publisher = PolicyPublisher(learner, interval=10)
    for _ in range(2):
        before = learner.updates
        learner.update_block(Batch.stack([_batch(rng) for _ in range(10)]))
        publisher.after_block(before)
        assert publisher.latest(-1) is None if learner.updates < 20 else publisher.latest(-1)[0] == 20
    publisher.snapshot()
    assert publisher.latest(-1)[0] == 20
