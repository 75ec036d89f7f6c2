"""Environments: the point-mass env against seed 000, the factory, seeds, rollouts and evaluation."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from sacfleet.actors.evaluate import evaluate
from sacfleet.actors.rollout import RANDOM_POLICY_VERSION, Rollout
from sacfleet.common.config import ConfigError, EnvConfig
from sacfleet.common.envs import POINTMASS_ID, describe_env, env_seeds, make_env
from sacfleet.common.pointmass import PointMassEnv
from sacfleet.learner.networks import PolicyNetwork


class SeedPointMass:
    """Seed 000's ContinuousPointMass1DEnv, transcribed as the test oracle."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.t, self.state = 0, np.zeros(2, np.float32)

    def reset(self):
        self.t = 0
        pos = self.rng.uniform(-1.0, 1.0)
        vel = self.rng.uniform(-1.0, 1.0)
        self.state = np.array([pos, vel], dtype=np.float32)
        return self.state.copy()

    def step(self, action):
        a = float(np.asarray(action, dtype=np.float32).reshape(-1)[0])
        a = float(np.clip(a, np.float32(-2.0), np.float32(2.0)))
        pos, vel = float(self.state[0]), float(self.state[1])
        vel = vel + 0.05 * a
        pos = pos + 0.05 * vel
        self.state = np.array([pos, vel], dtype=np.float32)
        reward = -(pos * pos + 0.1 * vel * vel + 0.001 * a * a)
        self.t += 1
        return self.state.copy(), float(reward), False, self.t >= 200


@pytest.mark.parametrize("dims", [1, 3])
# The checker advises a [-1, 1] action range and finite observation bounds; the seed's env has
# neither, on purpose (action limit 2.0, unbounded position), and the advice is not a failure.
@pytest.mark.filterwarnings("ignore:.*(symmetric and normalized|infinity).*:UserWarning")
def test_point_mass_passes_gymnasium_env_checker(dims):
    check_env(PointMassEnv(dims=dims), skip_render_check=True)
    check_env(gym.make(POINTMASS_ID, dims=dims).unwrapped, skip_render_check=True)


def test_point_mass_1d_is_the_seed_env_step_for_step():
    ours = gym.make(POINTMASS_ID)
    ref = SeedPointMass(seed=42)
    rng = np.random.default_rng(0)
    obs, _ = ours.reset(seed=42)
    np.testing.assert_array_equal(obs, ref.reset())
    for episode in range(3):
        if episode:
            obs, _ = ours.reset()
            np.testing.assert_array_equal(obs, ref.reset())
        for t in range(200):
            action = rng.uniform(-3, 3, size=1).astype(np.float32)  # includes out-of-bounds actions
            o1, r1, te1, tr1, _ = ours.step(action)
            o2, r2, te2, tr2 = ref.step(action)
            np.testing.assert_array_equal(o1, o2)
            assert r1 == r2 and te1 == te2 and tr1 == tr2
        assert tr1  # 200-step horizon
    assert ours.action_space.high[0] == 2.0 and ours.observation_space.shape == (2,)


def test_point_mass_n_dims_sums_independent_axes():
    env = PointMassEnv(dims=2)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (4,)
    obs2, reward, *_ = env.step(np.array([1.0, -1.0], np.float32))
    pos, vel = obs2[:2].astype(np.float64), obs2[2:].astype(np.float64)
    assert reward == pytest.approx(-(np.sum(pos ** 2) + 0.1 * np.sum(vel ** 2) + 0.002), rel=1e-6)


def test_factory_errors_name_the_problem():
    with pytest.raises(ConfigError, match="env.id: 'HalfCheeta-v5' is not a registered .*HalfCheetah-v5"):
        make_env(EnvConfig(id="HalfCheeta-v5"))
    with pytest.raises(ConfigError, match="continuous"):
        make_env(EnvConfig(id="CartPole-v1"))
    with pytest.raises(ConfigError, match="env.kwargs"):
        make_env(EnvConfig(id=POINTMASS_ID, kwargs={"no_such_arg": 1}))


@pytest.mark.parametrize("env_id", ["Pendulum-v1", "HalfCheetah-v5", "Hopper-v5", "Walker2d-v5", "Ant-v5",
                                    "Humanoid-v5", "Pusher-v5"])
def test_factory_makes_every_supported_env(env_id):
    info = describe_env(EnvConfig(id=env_id))
    assert info.obs_dim > 0 and info.act_dim > 0 and (info.action_low < info.action_high).all()


def test_env_seeds_are_distinct_and_reproducible():
    a = env_seeds(0, 0, 0, 8)
    assert len(set(a)) == 8 and a == env_seeds(0, 0, 0, 8)
    assert set(a).isdisjoint(env_seeds(0, 0, 1, 8))  # another actor
    assert set(a).isdisjoint(env_seeds(0, 1, 0, 8))  # the evaluation stream
    assert set(a).isdisjoint(env_seeds(1, 0, 0, 8))  # another run seed


def _short_env(max_steps=5):
    return EnvConfig(id=POINTMASS_ID, kwargs={"max_steps": max_steps})


def test_rollout_never_links_two_episodes():
    cfg = _short_env(max_steps=5)
    rollout = Rollout(cfg, describe_env(cfg), num_envs=3, seed=0)
    batches = [rollout.step(random_actions=True) for _ in range(12)]
    for b in batches:
        # Every transition obeys the dynamics, including the last of an episode; a next_obs taken
        # from the reset observation would break this.
        a = np.clip(b["action"][:, 0], -2, 2).astype(np.float64)
        vel = b["obs"][:, 1].astype(np.float64) + 0.05 * a
        pos = b["obs"][:, 0].astype(np.float64) + 0.05 * vel
        np.testing.assert_allclose(b["next_obs"], np.stack([pos, vel], 1), rtol=1e-6, atol=1e-6)
        assert not b["terminated"].any()
    assert [bool(b["truncated"].all()) for b in batches] == [i % 5 == 4 for i in range(12)]
    # After a truncation the next transition starts from a fresh reset state, not the final one.
    assert not np.allclose(batches[5]["obs"], batches[4]["next_obs"])
    np.testing.assert_allclose(batches[6]["obs"], batches[5]["next_obs"])
    finished = rollout.pop_finished()
    assert len(finished) == 6 and all(length == 5 and success is None for _, length, success in finished)
    assert rollout.pop_finished() == []
    assert (batches[0]["policy_version"] == RANDOM_POLICY_VERSION).all()
    rollout.close()


def test_rollout_is_reproducible_and_actors_differ():
    cfg = _short_env(200)
    info = describe_env(cfg)
    a, b, c = (Rollout(cfg, info, 2, seed=7, actor_index=i) for i in (0, 0, 1))
    network = PolicyNetwork(2, 1, [8], info.action_low, info.action_high)
    weights = {k: v.numpy() for k, v in network.state_dict().items()}
    for r in (a, b, c):
        r.load_weights(weights, version=3)
    steps = [[r.step(random_actions=i < 3) for i in range(6)] for r in (a, b, c)]
    for x, y in zip(steps[0], steps[1]):
        for k in x:
            if k != "episode":  # random per rollout: ids only group an episode's transitions
                np.testing.assert_array_equal(x[k], y[k])
    assert len(set(steps[0][0]["episode"]) | set(steps[1][0]["episode"]) | set(steps[2][0]["episode"])) == 6
    assert not np.array_equal(steps[0][0]["obs"], steps[2][0]["obs"])
    assert (steps[0][5]["policy_version"] == 3).all()


def test_zero_policy_evaluation_matches_the_zero_action_baseline():
    info = describe_env(EnvConfig())
    actor = PolicyNetwork(info.obs_dim, info.act_dim, [8], info.action_low, info.action_high)
    with torch.no_grad():
        for p in actor.parameters():
            p.zero_()  # mean 0 -> action 0
    returns, success_rate = evaluate(actor, EnvConfig(), episodes=100, seed=0)
    assert returns.shape == (100,) and success_rate is None  # the point mass reports no success
    # The measurement of the zero action over 100 episodes: -2,335.
    assert -2800 < returns.mean() < -1900
    np.testing.assert_array_equal(returns, evaluate(actor, EnvConfig(), episodes=100, seed=0)[0])
