"""SAC core: log-probabilities, losses, temperature, Polyak averaging, checkpoint state."""

import copy

import numpy as np
import pytest
import torch
from torch.distributions import AffineTransform, Normal, TanhTransform, TransformedDistribution

from sacfleet.learner import (Batch, LearnerDiverged, PolicyNetwork, SACLearner, TwinCritic, actor_loss, alpha_loss,
                              critic_loss, critic_target, polyak_update, q_values, squashed_log_prob, symexp, symlog)


def reference_log_prob(u, mean, log_std, low, high):
    """torch's log-density of the env action scale * tanh(u) + bias, and that action."""
    scale, bias = (high - low) / 2, (high + low) / 2
    dist = TransformedDistribution(Normal(mean, log_std.exp()),
                                   [TanhTransform(cache_size=1), AffineTransform(bias, scale)])
    action = dist.transforms[1](dist.transforms[0](u))  # keeps u cached, as rsample would
    return dist.log_prob(action).sum(-1), action


def normalized_reference_log_prob(u, mean, log_std, low, high):
    """The log-density of the normalized action tanh(u): the env action's, plus sum(log scale) by the
    change of variables a_env = scale * a + bias."""
    return reference_log_prob(u, mean, log_std, low, high)[0] + torch.log((high - low) / 2).sum(-1)


@pytest.mark.parametrize("low,high", [(-1.0, 1.0), (-2.0, 2.0), (-0.4, 0.4), (0.0, 3.0)])
def test_log_prob_matches_torch_transformed_distribution(low, high):
    torch.manual_seed(0)
    mean = torch.randn(512, 3, dtype=torch.float64)
    log_std = torch.rand(512, 3, dtype=torch.float64) - 1.0
    u = mean + log_std.exp() * torch.randn_like(mean)
    u = u[(u.abs() < 3).all(-1)]  # non-saturated samples, where the reference is accurate
    mean, log_std = mean[: len(u)], log_std[: len(u)]
    lo, hi = torch.full((3,), low, dtype=torch.float64), torch.full((3,), high, dtype=torch.float64)
    ours = squashed_log_prob(u, mean, log_std)
    ref = normalized_reference_log_prob(u, mean, log_std, lo, hi)
    assert len(u) > 400
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_log_prob_is_finite_when_tanh_saturates():
    u = torch.tensor([[30.0], [-30.0], [80.0], [-200.0]])
    mean, log_std = torch.zeros_like(u), torch.zeros_like(u)
    out = squashed_log_prob(u, mean, log_std)
    assert torch.isfinite(out).all()
    # A naive log(1 - tanh(u)^2 + eps) would flatten here; the exact form keeps decreasing.
    assert out[2] < out[0]


def test_actor_samples_respect_asymmetric_bounds_and_log_prob():
    torch.manual_seed(1)
    low, high = np.array([0.0, -3.0], np.float32), np.array([1.0, 5.0], np.float32)
    actor = PolicyNetwork(4, 2, [32, 32], low, high)
    obs = torch.randn(256, 4)
    action, log_prob = actor.sample(obs)
    assert (action >= torch.as_tensor(low)).all() and (action <= torch.as_tensor(high)).all()
    det = actor.deterministic(obs)
    assert (det >= torch.as_tensor(low)).all() and (det <= torch.as_tensor(high)).all()
    # log_prob agrees with the reference evaluated at the same pre-squash sample.
    gen = torch.Generator().manual_seed(5)
    _, log_prob = actor.sample(obs, generator=gen)
    mean, log_std = actor(obs)
    u = mean + log_std.exp() * torch.randn(mean.shape, generator=torch.Generator().manual_seed(5))
    keep = (u.abs() < 3).all(-1)
    ref = normalized_reference_log_prob(u[keep].double(), mean[keep].double(), log_std[keep].double(),
                                        torch.as_tensor(low).double(), torch.as_tensor(high).double())
    torch.testing.assert_close(log_prob[keep].double(), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("bound", [0.4, 2.0])
def test_the_entropy_target_is_met_in_normalized_action_units_whatever_the_bounds(bound):
    """Humanoid's +-0.4 or Pusher's +-2 change the env actions, not the log-probs the temperature and the
    losses see: those are of the normalized action, so that -|A| means what SAC and SB3 mean by it."""
    act_dim = 17
    ones = np.ones(act_dim, np.float32)
    unit = PolicyNetwork(5, act_dim, [32], -ones, ones)
    scaled = PolicyNetwork(5, act_dim, [32], -bound * ones, bound * ones)
    scaled.load_state_dict({**unit.state_dict(), "action_scale": scaled.action_scale, "action_bias": scaled.action_bias})
    obs = torch.randn(64, 5)
    a_unit, lp_unit = unit.sample(obs, torch.Generator().manual_seed(7))
    a_scaled, lp_scaled = scaled.sample(obs, torch.Generator().manual_seed(7))
    torch.testing.assert_close(a_scaled, bound * a_unit)
    assert torch.equal(lp_scaled, lp_unit)
    learner = SACLearner(5, act_dim, -bound * ones, bound * ones, hidden_sizes=(32,))
    assert learner.target_entropy == -act_dim
    # The temperature's gradient says raise alpha exactly when the normalized entropy is below -|A|.
    log_alpha = torch.zeros((), requires_grad=True)
    alpha_loss(log_alpha, lp_scaled, learner.target_entropy).backward()
    assert (log_alpha.grad < 0) == bool(-lp_unit.mean() < -act_dim)


def test_twin_critic_members_are_independent_linear_stacks():
    torch.manual_seed(2)
    critic = TwinCritic(3, 2, [16, 16])
    obs, act = torch.randn(8, 3), torch.randn(8, 2)
    q = critic(obs, act)
    assert q.shape == (2, 8)
    for i in range(2):
        x = torch.cat([obs, act], -1)
        for j, layer in enumerate(critic.layers):
            x = x @ layer.weight[i] + layer.bias[i]
            if j < len(critic.layers) - 1:
                x = torch.relu(x)
        torch.testing.assert_close(q[i], x.squeeze(-1))
    assert not torch.allclose(q[0], q[1])


class ConstantCritic(torch.nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, obs, action):
        return torch.full((2, obs.shape[0]), self.value)


def _batch(terminated, truncated_reward=1.0):
    n = len(terminated)
    return Batch(obs=torch.zeros(n, 2), action=torch.zeros(n, 1), reward=torch.full((n,), truncated_reward),
                 next_obs=torch.zeros(n, 2), terminated=torch.tensor(terminated, dtype=torch.float32))


def test_critic_target_bootstraps_through_truncation_but_not_termination():
    actor = PolicyNetwork(2, 1, [8], np.array([-1.0], np.float32), np.array([1.0], np.float32))
    # Row 0: truncated by a time limit (terminated=0): must bootstrap. Row 1: terminated.
    batch = _batch([0.0, 1.0])
    alpha = torch.tensor(0.0)
    target = critic_target(actor, ConstantCritic(10.0), batch, alpha, gamma=0.9)
    torch.testing.assert_close(target, torch.tensor([1.0 + 0.9 * 10.0, 1.0]))
    # The Batch deliberately has no truncation field, so truncation cannot stop bootstrapping.
    assert "truncated" not in Batch.__dataclass_fields__


def test_critic_target_includes_entropy_term_and_reward_scale():
    torch.manual_seed(3)
    actor = PolicyNetwork(2, 1, [8], np.array([-1.0], np.float32), np.array([1.0], np.float32))
    batch = _batch([0.0])
    torch.manual_seed(4)
    _, log_prob = actor.sample(batch.next_obs)
    torch.manual_seed(4)
    target = critic_target(actor, ConstantCritic(0.0), batch, torch.tensor(0.5), gamma=1.0, reward_scale=3.0)
    torch.testing.assert_close(target, 3.0 - 0.5 * log_prob)


@pytest.mark.parametrize("entropy_gap,direction", [(+1.0, "up"), (-1.0, "down")])
def test_alpha_rises_below_target_entropy_and_falls_above(entropy_gap, direction):
    target_entropy = -1.0
    # entropy = -log_prob; entropy below target means log_prob above -target_entropy.
    log_prob = torch.full((64,), -target_entropy + entropy_gap)
    log_alpha = torch.tensor(0.0, requires_grad=True)
    opt = torch.optim.Adam([log_alpha], lr=0.1)
    for _ in range(5):
        opt.zero_grad()
        alpha_loss(log_alpha, log_prob, target_entropy).backward()
        opt.step()
    assert (log_alpha.item() > 0) == (direction == "up")


def test_polyak_moves_targets_by_tau():
    source = [torch.full((3,), 1.0), torch.full((2, 2), -4.0)]
    target = [torch.zeros(3), torch.zeros(2, 2)]
    ids = [t.data_ptr() for t in target]
    polyak_update(source, target, 0.25)
    torch.testing.assert_close(target[0], torch.full((3,), 0.25))
    torch.testing.assert_close(target[1], torch.full((2, 2), -1.0))
    assert ids == [t.data_ptr() for t in target]  # in place


def _learner(**kw):
    torch.manual_seed(0)
    return SACLearner(3, 2, np.array([-1, -1], np.float32), np.array([1, 1], np.float32), hidden_sizes=(32, 32), **kw)


def _random_batch(seed, n=64):
    g = torch.Generator().manual_seed(seed)
    return Batch(obs=torch.randn(n, 3, generator=g), action=torch.rand(n, 2, generator=g) * 2 - 1,
                 reward=torch.randn(n, generator=g), next_obs=torch.randn(n, 3, generator=g),
                 terminated=(torch.rand(n, generator=g) < 0.1).float())


def test_update_changes_weights_moves_targets_and_reports_metrics():
    learner = _learner(tau=0.5)
    before = copy.deepcopy(learner.state_dict())
    td = learner.update(_random_batch(0))
    assert td.shape == (64,) and (td >= 0).all()
    assert learner.updates == 1
    after = learner.state_dict()
    for key in ("actor", "critic", "target_critic"):
        changed = [not torch.equal(before[key][k], after[key][k]) for k in before[key]]
        assert any(changed), key
    assert not torch.equal(before["log_alpha"], after["log_alpha"])
    metrics = learner.metrics.read()
    assert set(metrics) >= {"train/critic_loss", "train/actor_loss", "train/ent_coef", "train/ent_coef_loss"}
    assert all(np.isfinite(v) for v in metrics.values())
    assert learner.metrics.read() == {}  # read resets


def test_fixed_alpha_stays_fixed():
    learner = _learner(learn_alpha=False, init_alpha=0.3)
    learner.update(_random_batch(0))
    assert learner.alpha.item() == pytest.approx(0.3)


def test_importance_weights_scale_the_critic_loss():
    batch = _random_batch(1)
    zero = Batch(**{**batch.__dict__, "weights": torch.zeros(64)})
    learner = _learner()
    critic_before = copy.deepcopy(learner.critic.state_dict())
    learner.update(zero)  # zero weights: the critic gets no gradient, so Adam leaves it unchanged
    for k, v in learner.critic.state_dict().items():
        torch.testing.assert_close(v, critic_before[k])


def test_state_dict_round_trip_resumes_identically():
    a = _learner()
    for i in range(3):
        a.update(_random_batch(i))
    b = _learner(init_alpha=0.01)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert b.updates == 3
    torch.manual_seed(42)
    td_a = a.update(_random_batch(9))
    torch.manual_seed(42)
    td_b = b.update(_random_batch(9))
    torch.testing.assert_close(td_a, td_b)
    for k, v in a.actor.state_dict().items():
        torch.testing.assert_close(v, b.actor.state_dict()[k])


def test_obs_clip_bounds_what_the_networks_see_and_travels_with_the_weights():
    from sacfleet.common.codec import decode_weights, encode_weights

    learner = SACLearner(2, 1, np.array([-2.0]), np.array([2.0]), hidden_sizes=(16, 16), obs_clip=3.0)
    far = np.array([[100.0, -50.0]], dtype=np.float32)
    edge = np.array([[3.0, -3.0]], dtype=np.float32)
    assert np.allclose(learner.actor.act(far, deterministic=True), learner.actor.act(edge, deterministic=True))
    action = torch.zeros(1, 1)
    assert torch.allclose(learner.critic(torch.as_tensor(far), action), learner.critic(torch.as_tensor(edge), action))
    # An actor built without the option (as env actors are) clips once it loads the learner's weights.
    weights, version = decode_weights(encode_weights(learner.policy_weights(), 7))
    policy = PolicyNetwork(2, 1, (16, 16), np.array([-2.0]), np.array([2.0]))
    assert not np.allclose(policy.act(far, deterministic=True), policy.act(edge, deterministic=True))
    policy.load_state_dict({k: torch.as_tensor(np.array(v)) for k, v in weights.items()})
    assert np.allclose(policy.act(far, deterministic=True), learner.actor.act(far, deterministic=True))
    unclipped = SACLearner(2, 1, np.array([-2.0]), np.array([2.0]), hidden_sizes=(16, 16))
    encode_weights(unclipped.policy_weights(), 0)  # "no clip" is finite, so the codec accepts it


def _learning_rates(learner):
    return [group["lr"] for optim in (learner.actor_optim, learner.critic_optim, learner.alpha_optim)
            for group in optim.param_groups]


def test_a_resume_takes_the_configured_learning_rates_not_the_checkpoint_ones():
    a = _learner(actor_lr=1e-3)
    a.update(_random_batch(0))
    b = _learner(actor_lr=1e-4)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert _learning_rates(b) == pytest.approx([1e-4, 3e-4, 3e-4])


def test_a_checkpoint_loads_into_the_optimizer_settings_of_the_learner_that_loads_it():
    """A CUDA-graph learner's optimizers keep their step counts on the device (capturable), and so do
    its checkpoints' param groups; a plain learner resuming one keeps its own settings, and a graph
    learner resuming a plain one its own."""
    from sacfleet.learner.compiled import arm_for_capture

    armed = _learner()
    armed.update(_random_batch(0))
    for optim in armed.optimizers:
        arm_for_capture(optim)
    plain = _learner()
    plain.load_state_dict(copy.deepcopy(armed.state_dict()))
    assert not any(group["capturable"] for optim in plain.optimizers for group in optim.param_groups)
    plain.update(_random_batch(1))
    again = _learner()
    for optim in again.optimizers:
        arm_for_capture(optim)
    again.load_state_dict(copy.deepcopy(plain.state_dict()))
    for optim in again.optimizers:
        assert all(group["capturable"] for group in optim.param_groups)
        steps = [state["step"] for state in optim.state.values()]
        assert steps and all(torch.is_tensor(step) and step.dtype == torch.float32 and float(step) == 2
                             for step in steps)


def test_symlog_and_symexp_are_inverse_and_odd():
    x = torch.tensor([-1e4, -3.0, -1e-3, 0.0, 1e-3, 3.0, 1e4], dtype=torch.float64)
    torch.testing.assert_close(symexp(symlog(x)), x)
    torch.testing.assert_close(symlog(-x), -symlog(x))
    torch.testing.assert_close(symlog(torch.tensor([np.e - 1.0])), torch.tensor([1.0]))
    assert torch.isfinite(symexp(torch.tensor([1e3]))).all()


def test_symlog_critic_loss_is_taken_in_symlog_space_and_q_is_read_through_symexp():
    batch = _batch([0.0, 0.0])
    q_target = torch.tensor([-0.5, -2000.0])
    exact = ConstantCritic(0.0)
    exact.forward = lambda obs, action: symlog(q_target).expand(2, -1)
    loss, td, _ = critic_loss(exact, batch, q_target, symlog_q=True)
    assert loss.item() == pytest.approx(0.0, abs=1e-10) and td.abs().max().item() < 1e-6
    # The same critic read as if it predicted Q directly is far off.
    assert critic_loss(exact, batch, q_target)[0].item() > 1e6
    torch.testing.assert_close(q_values(exact, batch.obs, batch.action, True)[0], q_target)
    # The target and the actor see Q = symexp(output).
    actor = PolicyNetwork(2, 1, [8], np.array([-1.0], np.float32), np.array([1.0], np.float32))
    target = critic_target(actor, ConstantCritic(float(np.log(101.0))), batch, torch.tensor(0.0),
                           gamma=0.5, symlog_q=True)
    torch.testing.assert_close(target, torch.tensor([1.0 + 0.5 * 100.0] * 2))
    loss_pi, _ = actor_loss(actor, ConstantCritic(float(np.log(101.0))), batch.obs, torch.tensor(0.0), symlog_q=True)
    assert loss_pi.item() == pytest.approx(-100.0, rel=1e-5)


def _fit_relative_error_near_the_goal(symlog_q: bool, seed: int) -> float:
    torch.manual_seed(seed)
    critic = TwinCritic(1, 1, [32, 32])
    optim = torch.optim.Adam(critic.parameters(), lr=3e-3)
    # A quadratic cost-to-go: about 0.1 near the goal and 10^4 far away, as on the point mass.
    p = torch.cat([torch.linspace(-1, 1, 200), torch.linspace(-100, 100, 200)])[:, None]
    q = -(p.squeeze(-1) ** 2 + 0.1)
    a = torch.zeros_like(p)
    batch = Batch(obs=p, action=a, reward=q, next_obs=p, terminated=torch.ones_like(q))
    for _ in range(600):
        loss, _, _ = critic_loss(critic, batch, q, symlog_q)
        optim.zero_grad()
        loss.backward()
        optim.step()
    with torch.no_grad():
        near = p.squeeze(-1).abs() <= 1
        pred = q_values(critic, p, a, symlog_q)[:, near]
        return ((pred - q[near]).abs() / q[near].abs()).mean().item()


@pytest.mark.parametrize("seed", [0, 1])
def test_a_symlog_critic_resolves_small_values_next_to_huge_ones(seed):
    """Why the point-mass preset uses symlog_q: a plain MSE fit is dominated by the huge values."""
    with_symlog = _fit_relative_error_near_the_goal(True, seed)
    plain = _fit_relative_error_near_the_goal(False, seed)
    assert with_symlog < 0.25, with_symlog
    assert plain > 10 * with_symlog, (plain, with_symlog)


def test_a_nan_batch_is_caught_and_named_at_the_update_where_it_happened():
    learner = _learner()
    for i in range(3):
        learner.update(_random_batch(i))
    learner.check_finite()  # healthy so far
    weights_before = learner.policy_weights()
    bad = _random_batch(3)
    bad.reward[5] = float("nan")
    learner.update(bad)
    learner.update(_random_batch(4))  # later updates do not move the blame
    with pytest.raises(LearnerDiverged, match=r"learner diverged at update 4: non-finite train/critic_loss") as info:
        learner.check_finite()
    assert info.value.update == 4 and "train/critic_grad_norm" in info.value.what
    # Nothing diverged leaves the learner: no weights to publish, no state to checkpoint.
    with pytest.raises(LearnerDiverged, match="update 4"):
        learner.policy_weights()
    with pytest.raises(LearnerDiverged, match="update 4"):
        learner.state_dict()
    assert all(np.isfinite(w).all() for w in weights_before.values())


def test_in_a_block_the_divergence_is_named_at_the_update_of_the_bad_batch():
    from sacfleet.learner.sac import Batch

    learner = _learner()
    learner.update(_random_batch(0))
    batches = [_random_batch(i) for i in range(1, 5)]
    batches[2].next_obs[1, 0] = float("inf")  # the third update of the block: update 1 + 3

    learner.update_block(Batch.stack(batches))
    learner.update_block(Batch.stack(batches))  # later bad updates do not move the blame
    with pytest.raises(LearnerDiverged, match=r"learner diverged at update 4: non-finite train/critic_loss"):
        learner.check_finite()


def test_overflow_from_huge_rewards_is_divergence_too():
    learner = _learner(reward_scale=1e30)  # finite rewards whose squared TD errors overflow float32
    learner.update(_random_batch(0))
    with pytest.raises(LearnerDiverged, match=r"update 1: non-finite train/critic_loss"):
        learner.check_finite()
    with pytest.raises(LearnerDiverged):
        learner.priorities(learner.update(_random_batch(1)))


def test_a_nonfinite_parameter_is_refused_even_before_an_update_sees_it():
    learner = _learner()
    learner.update(_random_batch(0))
    with torch.no_grad():
        next(learner.actor.parameters())[0, 0] = float("inf")
    with pytest.raises(LearnerDiverged, match=r"update 1: non-finite actor parameters \(trunk.0.weight\)"):
        learner.policy_weights()
    with pytest.raises(LearnerDiverged, match="actor.trunk.0.weight"):
        learner.state_dict()


def test_the_divergence_watch_survives_pickling_and_a_resume_restarts_its_count():
    import pickle

    exc = pickle.loads(pickle.dumps(LearnerDiverged(12, "train/actor_loss")))  # as Ray ships it
    assert (exc.update, exc.what) == (12, "train/actor_loss") and "update 12" in str(exc)
    a = _learner()
    for i in range(5):
        a.update(_random_batch(i))
    b = _learner()
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    bad = _random_batch(9)
    bad.obs[0, 0] = float("inf")
    b.update(bad)
    with pytest.raises(LearnerDiverged, match="update 6"):
        b.check_finite()


def test_loading_a_checkpoint_keeps_this_learners_configured_obs_clip():
    """obs_clip lives in network buffers: a resume with another learner.obs_clip must apply it."""
    unclipped = _learner()
    unclipped.update(_random_batch(0))
    resumed = _learner(obs_clip=5.0)
    resumed.load_state_dict(copy.deepcopy(unclipped.state_dict()))
    for module in (resumed.actor, resumed.critic, resumed.target_critic):
        assert module.obs_clip.item() == 5.0
    torch.testing.assert_close(resumed.actor.trunk[0].weight, unclipped.actor.trunk[0].weight)
    far = np.full((1, 3), 100.0, np.float32)
    assert np.allclose(resumed.actor.act(far, deterministic=True), resumed.actor.act(far / 20, deterministic=True))
    assert resumed.policy_weights()["obs_clip"] == 5.0


def test_metrics_are_means_over_the_period_and_the_reward_scale_its_largest():
    learner = _learner()
    big = _random_batch(1)
    big.reward[3] = -50.0
    for batch in (_random_batch(0), big, _random_batch(2)):
        learner.update(batch)
    metrics = learner.metrics.read()
    assert metrics["train/reward_abs_max"] == 50.0
    assert learner.update(_random_batch(3)) is not None and learner.metrics.read()["train/reward_abs_max"] < 50.0
