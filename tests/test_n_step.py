"""n-step returns (replay.n_step), computed in the shard at sample time: exact sums, discounts and
bootstrap states on hand-built episodes (interleaved envs, truncation, termination, the ring's
wraparound, overwritten and unfinished episodes), with uniform and prioritized sampling, through a
snapshot, and the learner's target with the per-sample discount."""

import numpy as np
import pytest
import torch

from sacfleet.common.config import ConfigError, load_config
from sacfleet.common.transitions import TransitionSpec
from sacfleet.learner import Batch, critic_target
from sacfleet.replay_server.rate_limiter import RateLimiter
from sacfleet.replay_server.table import ReplayTable, snapshot_parts

SPEC = TransitionSpec(1, 1)
GAMMA = 0.9


def table(capacity, n, sampler="uniform", seed=0):
    limiter = RateLimiter(samples_per_insert=1.0, min_size_to_sample=1, error_buffer=1e12)
    return ReplayTable(SPEC, capacity, limiter, sampler=sampler, seed=seed, n_step=n, gamma=GAMMA)


def build(tab, episodes, chunk=3, seed=0):
    """Insert `episodes` (per env, a list of (length, end) with end "terminated", "truncated" or None
    for an episode still running) step by step across envs, `chunk` steps of one env at a time in a
    random env order, as actors' chunks arrive. Each transition's obs is its insertion number k and its
    next_obs k + 0.5, its reward a value of its own. Returns every transition as a dict by k."""
    rng = np.random.default_rng(seed)
    streams = []
    episode_id = 1000
    for env in episodes:
        rows = []
        for length, end in env:
            rows += [(episode_id, t, t == length - 1 and end) for t in range(length)]
            episode_id += 1
        streams.append(rows)
    made, k = {}, 0
    while any(streams):
        env = rng.choice([i for i, s in enumerate(streams) if s])
        rows, streams[env] = streams[env][:chunk], streams[env][chunk:]
        batch = SPEC.empty(len(rows))
        for i, (ep, t, end) in enumerate(rows):
            reward = float(rng.normal())
            batch["obs"][i], batch["next_obs"][i], batch["reward"][i] = k, k + 0.5, reward
            batch["episode"][i] = ep
            batch["terminated"][i] = end == "terminated"
            batch["truncated"][i] = end == "truncated"
            made[k] = {"episode": ep, "step": t, "reward": reward, "terminated": end == "terminated",
                       "done": bool(end)}
            k += 1
        tab.insert(batch)
    return made


def expected(made, k, n):
    """The n-step transition of transition k, from the episodes as built: (reward, next_obs,
    terminated, discount)."""
    by_step = {(row["episode"], row["step"]): key for key, row in made.items()}
    total, key, j = 0.0, k, 0
    while True:
        total += GAMMA ** j * made[key]["reward"]
        j += 1
        following = by_step.get((made[key]["episode"], made[key]["step"] + 1))
        if j == n or made[key]["done"] or following is None:
            return total, key + 0.5, made[key]["terminated"], GAMMA ** j
        key = following


EPISODES = [
    [(7, "terminated"), (4, "truncated"), (9, None)],     # a termination, a truncation, one still running
    [(2, "truncated"), (12, "terminated"), (5, None)],
    [(1, "terminated"), (6, "truncated"), (3, "truncated"), (8, None)],
]


@pytest.mark.parametrize("sampler", ["uniform", "prioritized"])
@pytest.mark.parametrize("n", [1, 3, 5])
@pytest.mark.parametrize("capacity", [1000, 37])  # 37: the ring wraps, older episodes partly overwritten
def test_sampled_transitions_are_exact_n_step_transitions(n, sampler, capacity):
    tab = table(capacity, n, sampler)
    made = build(tab, EPISODES)
    inserted = len(made)
    assert tab.size == min(capacity, inserted)
    sample = tab.sample(20, 32)
    data = {name: array.reshape(-1, *array.shape[2:]) for name, array in sample.data.items()}
    seen = set()
    for i, k in enumerate(data["obs"][:, 0].astype(int)):
        assert k >= inserted - capacity  # only stored transitions are sampled
        reward, next_obs, terminated, discount = expected(made, k, n)
        assert data["reward"][i] == pytest.approx(reward, abs=1e-5)
        assert data["next_obs"][i, 0] == next_obs and bool(data["terminated"][i]) == terminated
        if n == 1:
            assert "discount" not in data  # the learner uses gamma itself
        else:
            assert data["discount"][i] == pytest.approx(discount)
        seen.add((made[k]["episode"], made[k]["step"]))
    assert len(seen) > 0.5 * min(capacity, inserted)
    assert np.array_equal(sample.keys.reshape(-1), data["obs"][:, 0].astype(np.int64))  # priorities go to k


def test_a_sum_never_crosses_an_overwritten_or_foreign_step():
    """Capacity 10 with one long episode: its steps older than the ring holds are gone, the sum from
    each stored step runs forward only (never wraps into overwritten slots that another episode now
    holds), and a step whose successors are not stored yet bootstraps after fewer steps."""
    tab = table(10, 5)
    made = build(tab, [[(25, None)], [(3, "terminated"), (3, "terminated")]], chunk=2)
    sample = tab.sample(8, 50)
    obs, next_obs = sample.data["obs"].reshape(-1), sample.data["next_obs"].reshape(-1)
    for k, reached in zip(obs.astype(int), next_obs):
        assert made[int(reached - 0.5)]["episode"] == made[k]["episode"] and reached > k
        assert expected(made, k, 5)[1] == reached


def test_the_n_step_index_is_rebuilt_from_a_snapshot():
    source = table(37, 3)
    made = build(source, EPISODES)
    header, segments = snapshot_parts(source)
    restored = table(37, 3, seed=5)
    restored.restore(header, segments)
    sample = restored.sample(10, 32)
    for i, k in enumerate(sample.data["obs"].reshape(-1).astype(int)):
        reward, next_obs, _, discount = expected(made, k, 3)
        assert sample.data["reward"].reshape(-1)[i] == pytest.approx(reward, abs=1e-5)
        assert sample.data["next_obs"].reshape(-1)[i] == next_obs
        assert sample.data["discount"].reshape(-1)[i] == pytest.approx(discount)


def test_the_target_uses_each_samples_discount():
    class ConstantCritic(torch.nn.Module):
        def forward(self, obs, action):
            return torch.full((2, obs.shape[0]), 10.0)

    from sacfleet.learner import PolicyNetwork

    actor = PolicyNetwork(1, 1, [4], np.array([-1.0]), np.array([1.0]))
    batch = Batch(obs=torch.zeros(3, 1), action=torch.zeros(3, 1), reward=torch.tensor([1.0, 2.0, 3.0]),
                  next_obs=torch.zeros(3, 1), terminated=torch.tensor([0.0, 0.0, 1.0]),
                  discount=torch.tensor([0.9, 0.729, 0.81]))
    target = critic_target(actor, ConstantCritic(), batch, torch.tensor(0.0), gamma=0.9)
    torch.testing.assert_close(target, torch.tensor([1.0 + 9.0, 2.0 + 7.29, 3.0]))


def test_n_step_with_hindsight_relabeling_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match="replay.n_step: 3 cannot be combined with replay.her"):
        load_config("fetchreach", ["replay.n_step=3"])
    assert load_config("halfcheetah", ["replay.n_step=3"]).replay.n_step == 3
