"""learner.critic: the plain MLP critics, LayerNorm critics and CrossQ (batch renormalization, no target
critics, the joint forward pass, the delayed policy), their state through checkpoints, and their config."""

import copy

import numpy as np
import pytest
import torch

from sacfleet.common.config import ConfigError, load_config
from sacfleet.learner import Batch, BatchRenorm, SACLearner, TwinCritic, evaluating
from sacfleet.learner.networks import BATCH_RENORM_EPS

OBS_DIM, ACT_DIM = 5, 2


def _learner(critic="mlp", seed=1, **kwargs):
    torch.manual_seed(seed)
    return SACLearner(OBS_DIM, ACT_DIM, -np.ones(ACT_DIM), np.ones(ACT_DIM), hidden_sizes=(32, 32), critic=critic,
                      **kwargs)


def _batch(seed=0, size=64):
    rng = np.random.default_rng(seed)
    return Batch.from_numpy({"obs": rng.normal(2.0, 3.0, (size, OBS_DIM)), "action": rng.uniform(-1, 1, (size, ACT_DIM)),
                             "reward": rng.normal(size=size), "next_obs": rng.normal(2.0, 3.0, (size, OBS_DIM)),
                             "terminated": rng.random(size) < 0.1}, None, torch.device("cpu"))


def renorm_reference(x, running_mean, running_var, steps, warmup, momentum=0.99, r_max=3.0, d_max=5.0):
    """Batch renormalization (Ioffe, 2017) in numpy, float64: (output before the affine map, new running
    mean, new running variance)."""
    mean, var = x.mean(0), x.var(0)
    std, running_std = np.sqrt(var + BATCH_RENORM_EPS), np.sqrt(running_var + BATCH_RENORM_EPS)
    r = np.clip(std / running_std, 1 / r_max, r_max) if steps >= warmup else 1.0
    d = np.clip((mean - running_mean) / running_std, -d_max, d_max) if steps >= warmup else 0.0
    out = (x - mean) / std * r + d
    return out, momentum * running_mean + (1 - momentum) * mean, momentum * running_var + (1 - momentum) * var


@pytest.mark.parametrize("steps,warmup", [(0, 100), (5, 3)])
def test_batch_renorm_in_training_mode_is_the_papers_and_eval_mode_uses_the_running_statistics(steps, warmup):
    """Within the warm-up, batch normalization; after it, renormalized towards the running statistics
    (r and d clipped); eval mode normalizes by the running statistics and changes nothing."""
    torch.manual_seed(0)
    layer = BatchRenorm(6, warmup=warmup)
    with torch.no_grad():
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.05, 4.0)  # far enough from the batch's that r and d are clipped
        layer.steps.fill_(steps)
        layer.weight.uniform_(0.5, 2.0)
        layer.bias.uniform_(-1, 1)
    x = torch.randn(128, 6, dtype=torch.float64).float() * 3 + 4
    start = {k: v.clone().double().numpy() for k, v in layer.state_dict().items()}
    expected, mean, var = renorm_reference(x.double().numpy(), start["running_mean"], start["running_var"], steps,
                                           warmup)
    out = layer(x)
    np.testing.assert_allclose(out.detach().numpy(), expected * start["weight"] + start["bias"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(layer.running_mean.numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.running_var.numpy(), var, rtol=1e-5, atol=1e-6)
    assert int(layer.steps) == steps + 1
    after = {k: v.clone() for k, v in layer.state_dict().items()}
    with evaluating(layer):
        evaluated = layer(x)
    assert layer.training and all(torch.equal(v, after[k]) for k, v in layer.state_dict().items())
    running = (x.double().numpy() - mean) / np.sqrt(var + BATCH_RENORM_EPS)
    np.testing.assert_allclose(evaluated.detach().numpy(), running * start["weight"] + start["bias"], rtol=1e-4,
                               atol=1e-4)


def test_batch_renorm_holds_r_and_d_constant_in_the_backward_pass():
    """Gradients flow through the batch's own mean and deviation, as in batch normalization, not through
    r and d: after the warm-up the gradient is batch normalization's times r."""
    torch.manual_seed(1)
    renorm, plain = BatchRenorm(4, warmup=0), BatchRenorm(4, warmup=10**9)
    with torch.no_grad():
        renorm.running_var.fill_(4.0)  # r = clip(sigma_B / 2): about 0.5 for unit-variance batches
    x = torch.randn(256, 4)
    grads = []
    for layer in (renorm, plain):
        xi = x.clone().requires_grad_(True)
        (layer(xi) * torch.arange(1.0, 5.0)).pow(2).sum().backward()
        grads.append(xi.grad)
    std = (x.var(0, correction=0) + BATCH_RENORM_EPS).sqrt()
    r = (std / (4.0 + BATCH_RENORM_EPS) ** 0.5).clamp(1 / 3, 3)
    d = (x.mean(0) / (4.0 + BATCH_RENORM_EPS) ** 0.5).clamp(-5, 5)
    # With y = x_hat_bn * r + d and loss sum(c^2 y^2): dL/dx = BN's backward of 2 c^2 y r.
    x_hat = (x - x.mean(0)) / std
    upstream = 2 * torch.arange(1.0, 5.0) ** 2 * (x_hat * r + d) * r
    expected = (upstream - upstream.mean(0) - x_hat * (upstream * x_hat).mean(0)) / std
    torch.testing.assert_close(grads[0], expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(grads[0], grads[1])


def test_crossq_builds_and_updates_no_target_critics():
    learner = _learner("crossq", critic_hidden_sizes=(32, 32))
    assert learner.target_critic is None and set(learner.networks) == {"actor", "critic"}
    assert not any("target" in name for name, _ in learner.critic.named_modules())
    before = copy.deepcopy(learner.critic.state_dict())
    for seed in range(3):
        learner.update(_batch(seed))
    state = learner.state_dict()
    assert "target_critic" not in state
    assert any(not torch.equal(v, before[k]) for k, v in learner.critic.state_dict().items())
    # Every batch-renormalized layer of the critics counted one training step per update: the joint pass.
    steps = [int(m.steps) for m in learner.critic.modules() if isinstance(m, BatchRenorm)]
    assert steps == [3] * 3


def test_the_joint_forward_pass_normalizes_both_halves_by_one_set_of_statistics():
    """CrossQ's critic sees [s; s'] and [a; a'] in one pass: its input layer's running mean moves towards
    the mean over both halves, once per update (two separate passes would move it twice, by each half)."""
    learner = _learner("crossq", critic_hidden_sizes=(32, 32))
    batch = _batch(3)
    reference = copy.deepcopy(learner.actor)
    torch.manual_seed(11)
    learner.update(batch)
    torch.manual_seed(11)  # the update's first draw is a' ~ pi(.|s') from the actor in eval mode
    with torch.no_grad(), evaluating(reference):
        next_action, _ = reference.sample(batch.next_obs)
    joint = torch.cat([torch.cat([batch.obs, batch.action], -1), torch.cat([batch.next_obs, next_action], -1)])
    expected = 0.01 * joint.mean(0)
    layer = learner.critic.input_norm
    for member in range(2):
        torch.testing.assert_close(layer.running_mean[member, 0], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.running_var[:, 0], (0.99 + 0.01 * joint.var(0, correction=0)).expand(2, -1),
                               rtol=1e-5, atol=1e-6)


def test_the_actor_loss_evaluates_the_critics_by_their_running_statistics():
    """Only the critic's training pass changes its statistics: the actor's loss reads the critics in eval
    mode, and the next actions come from the actor in eval mode (the actor's own statistics move once
    per policy update)."""
    learner = _learner("crossq", critic_hidden_sizes=(32, 32), policy_delay=1)
    for seed in range(4):
        learner.update(_batch(seed))
    critic_steps = {int(m.steps) for m in learner.critic.modules() if isinstance(m, BatchRenorm)}
    actor_steps = {int(m.steps) for m in learner.actor.modules() if isinstance(m, BatchRenorm)}
    assert critic_steps == {4} and actor_steps == {4}
    assert learner.actor.training and learner.critic.training  # the modes are restored after each use


def test_the_policy_learns_every_policy_delay_updates():
    learner = _learner("crossq", critic_hidden_sizes=(32, 32), policy_delay=3)
    changed = []
    for seed in range(7):
        before = copy.deepcopy(learner.actor.state_dict())
        learner.update(_batch(seed))
        changed.append(any(not torch.equal(v, before[k]) for k, v in learner.actor.state_dict().items()))
    assert changed == [True, False, False, True, False, False, True]
    metrics = learner.metrics.read()
    assert metrics["train/actor_loss"] != 0.0  # the mean over the three updates that trained it, not diluted


def test_adam_uses_the_configured_beta1():
    learner = _learner("crossq", adam_beta1=0.5)
    assert all(group["betas"] == (0.5, 0.999) for optim in learner.optimizers for group in optim.param_groups)


def test_layernorm_critics_normalize_each_hidden_layer_per_member():
    torch.manual_seed(0)
    critic = TwinCritic(OBS_DIM, ACT_DIM, [16, 16], norm="layernorm")
    with torch.no_grad():
        critic.norms[0].weight[1].mul_(3.0)  # the members' gains are their own
    seen = []
    critic.norms[0].register_forward_hook(lambda module, args, out: seen.append((args[0], out)))
    critic(torch.randn(8, OBS_DIM) * 10, torch.randn(8, ACT_DIM))
    x, out = seen[0]
    normalized = (x - x.mean(-1, keepdim=True)) / (x.var(-1, correction=0, keepdim=True) + 1e-5).sqrt()
    torch.testing.assert_close(out[0], normalized[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[1], 3.0 * normalized[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("critic", ["mlp", "layernorm", "crossq"])
def test_a_checkpoint_round_trip_restores_every_modes_learned_state(critic):
    """A resumed learner continues exactly: weights, optimizer moments and batch renormalization's
    running statistics and step counts all come back."""
    source = _learner(critic, critic_hidden_sizes=(32, 32))
    for seed in range(4):
        source.update(_batch(seed))
    state = copy.deepcopy(source.state_dict())
    resumed = _learner(critic, seed=9, critic_hidden_sizes=(32, 32))
    resumed.load_state_dict(state)
    for name in source.networks:
        for key, value in getattr(source, name).state_dict().items():
            assert torch.equal(getattr(resumed, name).state_dict()[key], value), (name, key)
    torch.manual_seed(5)
    td_source = source.update(_batch(7))
    torch.manual_seed(5)
    td_resumed = resumed.update(_batch(7))
    assert torch.equal(td_source, td_resumed)


def test_crossq_sets_its_published_settings_unless_told_otherwise():
    cfg = load_config("hopper", ["learner.critic=crossq"])
    assert (cfg.learner.critic_hidden_sizes, cfg.learner.policy_delay, cfg.learner.adam_beta1) == ([2048, 2048], 3, 0.5)
    cfg = load_config("hopper", ["learner.critic=crossq", "learner.critic_hidden_sizes=[256, 256]",
                                 "learner.policy_delay=1", "learner.adam_beta1=0.9"])
    assert (cfg.learner.critic_hidden_sizes, cfg.learner.policy_delay, cfg.learner.adam_beta1) == ([256, 256], 1, 0.9)
    cfg = load_config("hopper", ["learner.critic=layernorm", "learner.hidden_sizes=[64, 64]"])
    assert (cfg.learner.critic_hidden_sizes, cfg.learner.policy_delay, cfg.learner.adam_beta1) == ([64, 64], 1, 0.9)
    with pytest.raises(ConfigError, match="learner.critic: 'droq' is not allowed; choose one of: mlp, layernorm, crossq"):
        load_config("hopper", ["learner.critic=droq"])


def test_crossq_with_symlog_critics_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match="crossq cannot be combined with learner.symlog_q=true"):
        load_config("pointmass", ["learner.critic=crossq"])  # the point-mass preset predicts symlog(Q)
    assert load_config("pointmass", ["learner.critic=crossq", "learner.symlog_q=false"]).learner.critic == "crossq"
