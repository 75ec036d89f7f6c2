"""Goal-conditioned tasks: Dict observations through codec, storage and snapshots; the goal point-mass
env; success rates; hindsight relabeling inside a shard; and HER learning what plain replay does not."""

import json
import subprocess
import sys

import numpy as np
import pytest

from sacfleet.actors.rollout import Rollout
from sacfleet.common.codec import CodecError, decode_chunk, encode_chunk
from sacfleet.common.config import ConfigError, EnvConfig, load_config
from sacfleet.common.envs import POINTMASS_GOAL_ID, check_env_config, describe_env, make_env
from sacfleet.common.metrics import EpisodeStats
from sacfleet.common.transitions import InvalidTransitions, TransitionSpec
from sacfleet.replay_server.rate_limiter import RateLimiter
from sacfleet.replay_server.shard import make_table
from sacfleet.replay_server.table import ReplayTable, snapshot_parts

GOAL_ENV = EnvConfig(id=POINTMASS_GOAL_ID)
# achieved_goal, desired_goal (2 each), observation (4): the goal point mass's layout.
SPEC = TransitionSpec(8, 2, (("achieved_goal", 2), ("desired_goal", 2), ("observation", 4)))


def goal_batch(n, rng, episode=None, steps=None):
    """n transitions of SPEC. achieved goals encode (episode, step + 1) so tests can tell where a
    relabeled goal came from."""
    batch = SPEC.empty(n)
    for name, array in batch.items():
        if array.dtype == np.float32:
            array[:] = rng.standard_normal(array.shape).astype(np.float32)
    if episode is not None:
        batch["episode"][:] = episode
        batch["next_obs/achieved_goal"][:, 0] = episode
        batch["next_obs/achieved_goal"][:, 1] = np.asarray(steps) + 1
    return batch


def table(capacity, her=None, seed=0):
    limiter = RateLimiter(samples_per_insert=1.0, min_size_to_sample=1, error_buffer=1e12)
    return ReplayTable(SPEC, capacity, limiter, seed=seed, her=her)


def sum_distance_reward(achieved, desired, info):
    """A vectorized compute_reward whose value identifies the goal pair."""
    return -np.abs(np.asarray(achieved) - np.asarray(desired)).sum(-1)


def never(achieved, desired, info):
    """compute_terminated of a GoalEnv that never terminates, as Fetch's: one False for the batch."""
    return False


def reached(achieved, desired, info):
    """compute_terminated of a GoalEnv whose episodes end where the goal is reached (within 1.5)."""
    return np.abs(np.asarray(achieved) - np.asarray(desired)).sum(-1) < 1.5


def insert_episodes(tab, lengths_per_env, chunk=5, done_last=True):
    """Insert the episodes of several envs interleaved step by step, as an actor's chunks are."""
    streams = []  # per env: list of (episode id, step, last)
    next_id = 100
    for lengths in lengths_per_env:
        rows = []
        for length in lengths:
            rows += [(next_id, t, t == length - 1 and done_last) for t in range(length)]
            next_id += 1
        streams.append(rows)
    rng = np.random.default_rng(0)
    position = 0
    while any(position < len(rows) for rows in streams):
        picked = [rows[t] for t in range(position, position + chunk) for rows in streams if t < len(rows)]
        position += chunk
        batch = goal_batch(len(picked), rng, episode=[p[0] for p in picked], steps=[p[1] for p in picked])
        batch["truncated"][:] = [p[2] for p in picked]
        tab.insert(batch)
    return streams


# ----------------------------------------------------------------------- Dict observations

def test_goal_env_describes_its_dict_layout_and_reports_success():
    info = describe_env(GOAL_ENV)
    assert info.obs_keys == (("achieved_goal", 2), ("desired_goal", 2), ("observation", 4))
    assert info.obs_dim == 8 and info.goal_conditioned and info.max_episode_steps == 50
    env = make_env(GOAL_ENV)
    obs, _ = env.reset(seed=3)
    np.testing.assert_array_equal(obs["achieved_goal"], obs["observation"][:2])
    goal = obs["desired_goal"]
    reward = env.unwrapped.compute_reward(np.stack([goal, goal + 1.0]), np.stack([goal, goal]), None)
    np.testing.assert_array_equal(reward, [0.0, -1.0])


def test_dict_transitions_round_trip_through_codec_storage_and_snapshot():
    rng = np.random.default_rng(1)
    batch = goal_batch(40, rng, episode=np.arange(40) // 10, steps=np.arange(40) % 10)
    decoded = decode_chunk(encode_chunk(batch, SPEC), SPEC)
    assert set(decoded) == set(SPEC.fields()) and "obs/desired_goal" in decoded and "episode" in decoded
    for name in batch:
        np.testing.assert_array_equal(decoded[name], batch[name])
    tab = table(64)
    tab.insert(decoded)
    restored = table(64)
    restored.restore(*snapshot_parts(tab))
    for name in batch:
        np.testing.assert_array_equal(restored.storage.data[name][:40], batch[name])
    # The learner sees the keys concatenated in obs_keys order.
    view = SPEC.learner_view(batch)
    np.testing.assert_array_equal(view["obs"], np.concatenate(
        [batch["obs/achieved_goal"], batch["obs/desired_goal"], batch["obs/observation"]], axis=1))
    assert "episode" not in view and view["next_obs"].shape == (40, 8)


@pytest.mark.parametrize("damage, message", [
    (lambda b: b.pop("obs/desired_goal"), "missing ['obs/desired_goal']"),
    (lambda b: b.update({"obs/goal": b.pop("obs/desired_goal")}), "unexpected ['obs/goal']"),
    (lambda b: b.update({"next_obs/observation": b["next_obs/observation"][:, :3]}), "next_obs/observation: shape"),
    (lambda b: b.update({"obs/achieved_goal": b["obs/achieved_goal"].astype(np.float64)}), "dtype float64"),
    (lambda b: b["next_obs/desired_goal"].__setitem__((2, 1), np.nan), "NaN"),
    (lambda b: b.update({"episode": b["episode"].astype(np.int32)}), "episode: dtype int32"),
])
def test_bad_dict_transitions_are_refused_with_the_field_named_and_nothing_stored(damage, message):
    rng = np.random.default_rng(2)
    tab = table(32)
    good = goal_batch(8, rng, episode=np.zeros(8), steps=np.arange(8))
    tab.insert(good)
    before = {name: array.copy() for name, array in tab.storage.data.items()}
    bad = goal_batch(8, rng, episode=np.ones(8), steps=np.arange(8))
    damage(bad)
    with pytest.raises(InvalidTransitions, match=message.replace("[", r"\[").replace("]", r"\]")):
        tab.insert(bad)
    with pytest.raises(CodecError, match="chunk"):
        encode_chunk(bad, SPEC)
    assert tab.size == 8
    for name, array in before.items():
        np.testing.assert_array_equal(tab.storage.data[name], array)


def test_a_snapshot_of_another_observation_layout_is_refused():
    other = TransitionSpec(8, 2, (("achieved_goal", 3), ("desired_goal", 3), ("observation", 2)))
    limiter = RateLimiter(samples_per_insert=1.0, min_size_to_sample=1, error_buffer=1e12)
    source = ReplayTable(other, 16, limiter)
    with pytest.raises(ValueError, match="obs_keys"):
        table(16).restore(*snapshot_parts(source))


def test_rollout_stores_each_key_with_true_last_observations_episode_ids_and_success():
    info = describe_env(GOAL_ENV)
    rollout = Rollout(GOAL_ENV, info, 3, seed=0)
    steps = [rollout.step(random_actions=True) for _ in range(120)]
    for t in steps:
        TransitionSpec.for_env(info).validate(t)
        # next_obs is the step's own result: its achieved goal is the position in its observation,
        # also at the last step of an episode (where the env has already been reset).
        np.testing.assert_array_equal(t["next_obs/achieved_goal"], t["next_obs/observation"][:, :2])
    seen = set(steps[0]["episode"].tolist())
    for before, after in zip(steps, steps[1:]):
        ended = before["truncated"]
        same = ~ended
        np.testing.assert_array_equal(after["episode"][same], before["episode"][same])
        np.testing.assert_array_equal(after["obs/observation"][same], before["next_obs/observation"][same])
        assert not seen & set(after["episode"][ended].tolist())  # a new episode gets a new id
        seen |= set(after["episode"].tolist())
    assert len(seen) == 3 * 3  # 120 steps of 50-step episodes: 3 episodes per env
    episodes = rollout.pop_finished()
    assert len(episodes) == 6 and all(length == 50 for _, length, _ in episodes)
    assert all(success in (0.0, 1.0) for _, _, success in episodes)
    rollout.close()


def test_success_rate_is_the_mean_over_episodes_that_report_one():
    stats = EpisodeStats(window=4)
    stats.extend([(-1.0, 10, 1.0), (-2.0, 10, 0.0), (-3.0, 10, None), (-4.0, 10, 1.0), (-5.0, 10, 1.0)])
    summary = stats.summary()
    assert summary["rollout/success_rate"] == pytest.approx(0.75)  # the last 4 reported: 1, 0, 1, 1
    assert "rollout/success_rate" not in EpisodeStats().summary()
    stats = EpisodeStats()
    stats.extend([(-1.0, 10), (-2.0, 10, None)])
    assert "rollout/success_rate" not in stats.summary()


# ----------------------------------------------------------------------- hindsight relabeling

def sample_goals(tab, n=4000, batch=200):
    """Sampled rows: (stored slot's episode, step, relabeled desired goal (episode, step), reward)."""
    rows = []
    for _ in range(n // batch):
        out = tab.sample(1, batch)
        keys = out.keys[0]
        slots = keys % tab.storage.capacity
        episode = tab.storage.data["episode"][slots]
        step = tab.storage.data["next_obs/achieved_goal"][slots, 1] - 1
        goal = out.data["obs"][0][:, 2:4]  # desired_goal in the learner's concatenated view
        stored_goal = tab.storage.data["obs/desired_goal"][slots]
        achieved = tab.storage.data["next_obs/achieved_goal"][slots]
        relabeled = ~np.all(goal == stored_goal, axis=1)
        # A relabeled goal is the desired goal of both observations.
        np.testing.assert_array_equal(goal[relabeled], out.data["next_obs"][0][relabeled, 2:4])
        np.testing.assert_allclose(out.data["reward"][0][relabeled],
                                   sum_distance_reward(achieved[relabeled], goal[relabeled], None), rtol=1e-6)
        np.testing.assert_array_equal(out.data["reward"][0][~relabeled],
                                      tab.storage.data["reward"][slots][~relabeled])
        rows.append(np.column_stack([episode, step, goal, relabeled]))
    return np.concatenate(rows)


def test_future_goals_come_from_the_same_episode_at_or_after_the_step_with_env_rewards():
    tab = table(10_000, her=("future", 4, sum_distance_reward, never))
    insert_episodes(tab, [[50, 50, 30], [50, 17, 50], [40, 40, 40]])
    rows = sample_goals(tab)
    episode, step, goal_episode, goal_step, relabeled = rows.T
    relabeled = relabeled.astype(bool)
    assert np.all(goal_episode[relabeled] == episode[relabeled])
    assert np.all(goal_step[relabeled] - 1 >= step[relabeled])
    # Goals reach to the episode's end: some come from its last step.
    assert (goal_step[relabeled] == 50).any()
    # k = 4: four relabeled per real one, within 3 standard deviations of 0.8 for 4,000 draws.
    assert relabeled.mean() == pytest.approx(0.8, abs=3 * np.sqrt(0.8 * 0.2 / 4000))


def test_goals_never_cross_an_episode_or_reach_overwritten_slots_after_ring_wraparound():
    tab = table(64, her=("episode", 3, sum_distance_reward, never))
    # 2 envs, 230 steps each: the 64-slot ring wraps many times and cuts episodes in the middle.
    insert_episodes(tab, [[23] * 10, [19] * 12 + [2]], chunk=3)
    alive = {(e, s) for e, s in zip(tab.storage.data["episode"],
                                    tab.storage.data["next_obs/achieved_goal"][:, 1] - 1)}
    rows = sample_goals(tab, n=3000, batch=50)
    episode, step, goal_episode, goal_step, relabeled = rows.T
    relabeled = relabeled.astype(bool)
    assert relabeled.any()
    assert np.all(goal_episode[relabeled] == episode[relabeled])
    assert all((e, s - 1) in alive for e, s in zip(goal_episode[relabeled], goal_step[relabeled]))
    assert relabeled.mean() == pytest.approx(0.75, abs=3 * np.sqrt(0.75 * 0.25 / 3000))


def test_a_goal_env_shard_relabels_with_the_envs_own_compute_reward():
    cfg = load_config(None, ["env.id=sacfleet/PointMassGoal-v0", "replay.her=future", "replay.capacity=5000",
                             "train.learning_starts=0", "learner.batch_size=256", "replay.error_buffer=1e12"])
    info = describe_env(cfg.env)
    tab = make_table(cfg, TransitionSpec.for_env(info), 0, 4, 256)
    rollout = Rollout(cfg.env, info, 4, seed=1)
    for _ in range(300):
        tab.insert(rollout.step(random_actions=True))
    rollout.close()
    out = tab.sample(4, 256)
    env = make_env(cfg.env).unwrapped
    achieved, desired = out.data["next_obs"][..., 0:2], out.data["next_obs"][..., 2:4]
    # Real and relabeled rewards alike are what the env gives for the (possibly new) goal.
    np.testing.assert_array_equal(out.data["reward"], env.compute_reward(achieved, desired, None))
    assert (out.data["reward"] == 0).mean() > 0.1  # relabeling made successes out of random play
    assert tab.her.relabeled / tab.her.sampled == pytest.approx(0.8, abs=0.05)


def test_relabeling_recomputes_terminated_for_the_new_goal_both_ways():
    """An env that terminates on reaching its goal: a transition stored as terminated (it reached the
    old goal) is not terminal for a far goal, and one stored as not terminated is for a goal it reached."""
    tab = table(10_000, her=("future", 4, sum_distance_reward, reached))
    insert_episodes(tab, [[30, 30], [30, 30]])
    rng = np.random.default_rng(4)
    flip = rng.random(tab.size) < 0.5
    tab.storage.data["terminated"][:tab.size] = flip  # stored flags, half of them set, whatever the goal
    changed = {True: 0, False: 0}
    for _ in range(20):
        out = tab.sample(1, 200)
        slots = out.keys[0] % tab.storage.capacity
        goal = out.data["obs"][0][:, 2:4]
        achieved = tab.storage.data["next_obs/achieved_goal"][slots]
        relabeled = ~np.all(goal == tab.storage.data["obs/desired_goal"][slots], axis=1)
        terminated = out.data["terminated"][0].astype(bool)
        np.testing.assert_array_equal(terminated[relabeled], reached(achieved[relabeled], goal[relabeled], None))
        np.testing.assert_array_equal(terminated[~relabeled], flip[slots][~relabeled])
        stored = flip[slots][relabeled]
        for was in (True, False):
            changed[was] += int((stored == was)[terminated[relabeled] != stored].sum())
    assert changed[True] > 0 and changed[False] > 0  # set flags cleared and clear flags set


def test_her_refuses_a_goal_env_without_compute_terminated():
    import gymnasium as gym

    from sacfleet.replay_server.her import env_goal_functions

    class RewardOnly(gym.Env):
        observation_space = gym.spaces.Dict({"observation": gym.spaces.Box(-1, 1, (2,)),
                                             "achieved_goal": gym.spaces.Box(-1, 1, (2,)),
                                             "desired_goal": gym.spaces.Box(-1, 1, (2,))})
        action_space = gym.spaces.Box(-1, 1, (2,))

        def compute_reward(self, achieved, desired, info):
            return np.zeros(np.shape(achieved)[:-1])

    gym.register("test/RewardOnlyGoal-v0", entry_point=lambda: RewardOnly())
    try:
        with pytest.raises(ConfigError, match=r"test/RewardOnlyGoal-v0 has no compute_terminated\(achieved_goal"):
            env_goal_functions(EnvConfig(id="test/RewardOnlyGoal-v0"))
    finally:
        del gym.registry["test/RewardOnlyGoal-v0"]
    reward, terminated = env_goal_functions(GOAL_ENV)
    assert not terminated(np.zeros((5, 2)), np.ones((5, 2)), None).any()


def test_the_index_forgets_overwritten_episodes_finished_or_not():
    tab = table(16, her=("future", 4, sum_distance_reward, never))
    rng = np.random.default_rng(3)
    tab.insert(goal_batch(10, rng, episode=np.full(10, 7), steps=np.arange(10)))  # never finishes
    tab.insert(goal_batch(10, rng, episode=np.full(10, 8), steps=np.arange(10)))
    assert tab.her.index.episodes[7].first == 4  # its first 4 steps overwritten
    finished = goal_batch(10, rng, episode=np.full(10, 8), steps=np.arange(10, 20))
    finished["truncated"][-1] = True
    tab.insert(finished)
    assert set(tab.her.index.episodes) == {8} and tab.her.index.episodes[8].first == 4
    rows = sample_goals(tab, n=400, batch=40)
    assert np.all(rows[rows[:, 4] == 1, 2] == 8) and np.all(rows[rows[:, 4] == 1, 3] - 1 >= 4)


def test_final_goals_are_the_last_step_and_unfinished_episodes_keep_their_own_goal():
    tab = table(1000, her=("final", 4, sum_distance_reward, never))
    insert_episodes(tab, [[20, 20], [20, 20]])
    unfinished = table(1000, her=("final", 4, sum_distance_reward, never))
    insert_episodes(unfinished, [[20]], done_last=False)
    rows = sample_goals(tab, n=2000)
    assert np.all(rows[rows[:, 4] == 1, 3] == 20)  # every relabeled goal is the step-20 achieved goal
    assert rows[:, 4].mean() == pytest.approx(0.8, abs=0.05)
    assert sample_goals(unfinished, n=1000)[:, 4].sum() == 0


def test_snapshot_and_restore_keep_the_episode_index():
    tab = table(64, her=("future", 4, sum_distance_reward, never), seed=5)
    insert_episodes(tab, [[30, 30, 30], [25, 25, 25]], chunk=4)
    restored = table(64, her=("future", 4, sum_distance_reward, never), seed=5)
    restored.restore(*snapshot_parts(tab))
    for _ in range(5):
        a, b = tab.sample(1, 128), restored.sample(1, 128)
        for name in a.data:
            np.testing.assert_array_equal(a.data[name], b.data[name])
    assert tab.her.relabeled == restored.her.relabeled > 0


def test_her_config_errors_name_the_key_and_the_reason():
    with pytest.raises(ConfigError, match="replay.her: 'always' is not allowed; choose one of: off, future"):
        load_config(None, ["replay.her=always"])
    with pytest.raises(ConfigError, match="replay.sampler=prioritized"):
        load_config(None, ["replay.her=future", "replay.sampler=prioritized"])
    with pytest.raises(ConfigError, match="replay.num_shards: 3 shards with replay.her on need"):
        load_config(None, ["replay.her=future", "replay.num_shards=3", "actors.num=2"])
    assert load_config(None, ["replay.her=off"]).replay.her == "off"  # YAML reads a bare off as false
    cfg = load_config("pointmass", ["replay.her=future"])
    with pytest.raises(ConfigError, match="needs a goal env .* sacfleet/PointMass-v0 has a flat Box"):
        check_env_config(cfg, describe_env(cfg.env))


# ----------------------------------------------------------------------- learning

GOAL_RUN = ["env.id=sacfleet/PointMassGoal-v0", "actors.num=1", "learner.hidden_sizes=[64, 64]",
            "learner.actor_lr=0.001", "learner.critic_lr=0.001", "learner.alpha_lr=0.001", "learner.gamma=0.95",
            "train.total_env_steps=10000", "train.learning_starts=1000", "train.log_interval=1000",
            "eval.interval=0", "eval.final_episodes=100", "learner.num_threads=1", "health.enabled=false"]


def test_her_reaches_goals_that_the_same_run_without_her_does_not(tmp_path):
    # The two runs go side by side, one core each (their networks use one thread).
    runs = {}
    for her in ("future", "off"):
        command = [sys.executable, "-m", "sacfleet", "train", "--inline", "--run-dir", str(tmp_path / her)]
        for override in [*GOAL_RUN, f"replay.her={her}"]:
            command += ["--set", override]
        runs[her] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for her, process in runs.items():
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, output
    with_her, without = (json.loads((tmp_path / her / "summary.json").read_text()) for her in ("future", "off"))
    assert with_her["eval"]["success_rate"] >= 0.6
    assert without["eval"]["success_rate"] <= 0.1
    # The success rates are reported where users read them.
    records = [json.loads(line) for line in (tmp_path / "future" / "metrics.jsonl").read_text().splitlines()]
    assert any("rollout/success_rate" in r for r in records)
    assert any(r.get("eval/success_rate") == with_her["eval"]["success_rate"] for r in records)
    assert any(r.get("replay/her_relabeled_fraction", 0) > 0.75 for r in records)
    assert len(with_her["eval"]["curve"][-1]) == 4  # [env steps, wall, return, success rate]
    assert (tmp_path / "future" / "eval_return.png").is_file()


def test_observation_normalization_of_a_goal_env_covers_the_concatenated_input_and_leaves_replay_raw(tmp_path):
    """The networks of a Dict env see [observation, achieved_goal, desired_goal] standardized as one
    vector; replay keeps raw observations, so HER's rewards are the env's for raw goals."""
    import torch

    from sacfleet.driver.train_inline import train_inline
    from sacfleet.replay_server.snapshot_files import read_shard

    cfg = load_config(None, ["env.id=sacfleet/PointMassGoal-v0", "replay.her=future", "learner.obs_norm=true",
                             "train.total_env_steps=600", "train.learning_starts=200", "learner.batch_size=32",
                             "learner.hidden_sizes=[16, 16]", "replay.samples_per_insert=32", "eval.interval=0",
                             "eval.final_episodes=2", "learner.num_threads=1", "learner.critic_warmup=50"])
    train_inline(cfg, tmp_path, echo=lambda line: None)
    state = torch.load(tmp_path / "checkpoints" / "checkpoint.pt", weights_only=True)
    actor = state["learner"]["actor"]
    assert actor["obs_norm.mean"].shape == (8,) and actor["obs_norm.count"].item() == 32 * state["learner"]["updates"]
    # Every part of the input varies (desired goals as the networks see them: relabeled ones included).
    assert (actor["obs_norm.var"] > 1e-3).all()
    cfg.replay.error_buffer = 1e12  # a table that samples without new inserts
    table = make_table(cfg, TransitionSpec.for_env(describe_env(cfg.env)), 0, 1, 32)
    table.restore(*read_shard(tmp_path / "checkpoints", state["replay"]["shards"][0]))
    out = table.sample(1, 32)
    env = make_env(cfg.env).unwrapped
    np.testing.assert_array_equal(out.data["reward"], env.compute_reward(out.data["next_obs"][..., 0:2],
                                                                         out.data["next_obs"][..., 2:4], None))
