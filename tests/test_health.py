"""Training health: each check fires on a constructed case, names the symptom, its cause and the key
that sets its limit, and stays silent on a healthy one; warnings confirm, persist and clear."""

import pytest

from sacfleet.common.config import load_config
from sacfleet.common.health import HealthMonitor, RunFacts, expected_policy_lag

# Records shaped like a healthy point-mass fleet run (values read off one: eval -6.9).
HEALTHY = {"train/q_mean": -0.6, "train/q1_mean": -0.61, "train/q2_mean": -0.6, "train/ent_coef": 0.003,
           "train/entropy": -0.9, "train/reward_abs_max": 60.0, "replay/samples_per_insert": 255.5,
           "learner/policy_lag": 80.0, "actors/insert_blocked_s": 0.3, "learner/starved_s": 0.0}


def monitor(*overrides, fleet=True):
    # The records above were read off a run with rewards scaled by 0.01 and gamma 0.98 (the preset
    # before issue 24).
    cfg = load_config("pointmass", ["learner.reward_scale=0.01", "learner.gamma=0.98", *overrides])
    return HealthMonitor(RunFacts.from_config(cfg, act_dim=1, fleet=fleet), cfg.health)


def feed(mon, records, start=2000, step=1000):
    """Feed records at start, start+step, ...; returns every warning that started."""
    started = []
    for i, record in enumerate(records):
        started += mon.observe(start + i * step, record)
    return started


def returns(values):
    return [{**HEALTHY, "rollout/ep_rew_mean": v} for v in values]


def test_a_healthy_point_mass_run_raises_nothing():
    mon = monitor()
    # The return improves from the warm-up's -1,950 to -310 while alpha falls from 0.005 to 1e-4.
    records = [{**HEALTHY, "rollout/ep_rew_mean": r, "train/ent_coef": a}
               for r, a in zip([-1950, -1280, -950, -750, -625, -518, -465, -413, -371, -338, -310],
                               [3e-3, 1.3e-3, 6e-4, 3e-4, 2e-4, 1e-4, 1e-4, 5e-5, 1e-4, 1e-4, 1e-4])]
    assert feed(mon, records) == []
    summary = mon.summary()
    assert summary["status"] == "ok" and summary["warnings"] == [] and summary["diverged"] is None
    assert mon.values()["health/warnings"] == 0
    assert set(summary["checks"]) >= {"q_blowup", "critic_disagreement", "alpha_collapse", "entropy_collapse",
                                      "return_stalled", "success_stalled", "replay_ratio_drift", "policy_lag",
                                      "actors_starved", "learner_starved"}


def test_a_point_mass_run_whose_100_episode_mean_lags_raises_nothing():
    """Early runaway episodes keep the 100-episode ep_rew_mean below its start for most of a point-mass
    run (a whole run holds fewer than 100 episodes); the recent episodes show it learned."""
    mon = monitor()
    means = [-2740, -14145, -8617, -6469, -5392, -4316, -3700, -3239, -2900, -2600, -2400]
    recent = [-2740, -20500, -1900, -400, -95, -40, -22, -15, -12, -10, -9]
    alphas = [3e-3, 1.5e-3, 8e-4, 4e-4, 2e-4, 1e-4, 6e-5, 4e-5, 4e-5, 3e-5, 3e-5]
    records = [{**HEALTHY, "rollout/ep_rew_mean": m, "rollout/ep_rew_recent": r, "train/ent_coef": a}
               for m, r, a in zip(means, recent, alphas)]
    assert feed(mon, records, start=1130) == []
    # Without the recent episodes the same run would look stalled.
    lagging = [{k: v for k, v in record.items() if k != "rollout/ep_rew_recent"} for record in records]
    assert "return_stalled" in [w.check for w in feed(monitor(), lagging, start=1130)]


def test_q_growing_far_beyond_what_rewards_allow_warns_after_two_records():
    mon = monitor()
    # |r| <= 60, reward_scale 0.01, gamma 0.98: |Q| <= (0.6 + alpha * 1) / 0.02, about 30.
    first = feed(mon, [{**HEALTHY, "train/q_mean": -400.0}])
    assert first == []  # one record is not enough: it must persist
    [warning] = feed(mon, [{**HEALTHY, "train/q_mean": -900.0}], start=3000)
    assert warning.check == "q_blowup" and "mean Q -900 is 29.9x the largest value the rewards allow" in warning.symptom
    # Far below every return: underestimation, with the runaway it usually follows.
    assert warning.cause.startswith("underestimation feedback") and "train.learning_starts" in warning.cause
    assert warning.limit_key == "health.q_bound_factor"
    assert "health warning (q_blowup) at 3,000 env steps" in warning.line()
    assert mon.active() == ["q_blowup"] and mon.values()["health/q_blowup"] == pytest.approx(29.9, abs=0.05)
    # Far above: overestimation.
    [above] = feed(monitor(), [{**HEALTHY, "train/q_mean": 900.0}] * 2)
    assert above.check == "q_blowup" and above.cause.startswith("overestimation feedback"), above.cause


def test_critics_disagreeing_by_an_order_of_magnitude_warn():
    mon = monitor()
    started = feed(mon, [{**HEALTHY, "train/q1_mean": -0.5, "train/q2_mean": -9.0}] * 2)
    assert [w.check for w in started] == ["critic_disagreement"]
    assert "disagree by 18.0x (mean Q1 -0.5, Q2 -9)" in started[0].symptom
    # Near-zero values early on say nothing about agreement.
    assert feed(monitor(), [{**HEALTHY, "train/q1_mean": -0.001, "train/q2_mean": -0.02}] * 3) == []


def test_temperature_collapse_early_and_before_learning_warns():
    mon = monitor("learner.init_alpha=1.0")
    flat = [{**HEALTHY, "rollout/ep_rew_mean": -2000.0, "train/ent_coef": a} for a in (0.5, 0.05, 0.004)]
    [warning] = feed(mon, flat)
    assert warning.check == "alpha_collapse" and "fell to 0.004 after 4,000 env steps" in warning.symptom
    assert "learner.alpha_lr 1e-4" in warning.cause
    # The same temperature once the return has improved is SAC converging, and late in training it is no collapse.
    learning = [{**HEALTHY, "rollout/ep_rew_mean": r, "train/ent_coef": a}
                for r, a in zip((-2000.0, -900.0, -400.0), (0.5, 0.05, 0.004))]
    assert feed(monitor("learner.init_alpha=1.0"), learning) == []
    assert feed(monitor("learner.init_alpha=1.0"), flat, start=20_000) == []
    assert feed(monitor("learner.init_alpha=1.0", "learner.learn_alpha=false"), flat) == []


def test_entropy_collapse_warns():
    [warning] = feed(monitor(), [{**HEALTHY, "train/entropy": -6.0}] * 2)
    assert warning.check == "entropy_collapse"
    assert "5.0 nats per action dimension below its target -1" in warning.symptom


def test_a_flat_return_warns_only_after_its_stretch():
    mon = monitor()  # 12,000 steps, learning from 1,000: a stretch of half of 11,000 steps
    started = feed(mon, returns([-2000.0, -1990.0, -2010.0, -2005.0, -1995.0]), start=2000)
    assert started == []  # 4,000 steps since learning began: not yet
    [warning] = feed(mon, returns([-2002.0, -1998.0]), start=7000)
    assert warning.check == "return_stalled" and "since learning began" in warning.symptom
    # Improvement clears it after three good readings.
    feed(mon, returns([-900.0, -600.0, -400.0]), start=9000)
    assert mon.active() == [] and mon.summary()["warnings"][0]["active_at_end"] is False


def test_a_success_rate_stalled_below_half_warns():
    mon = monitor()
    records = [{**HEALTHY, "rollout/success_rate": s} for s in (0.05, 0.1, 0.08, 0.1, 0.12, 0.1, 0.11, 0.1)]
    started = feed(mon, records)
    assert [w.check for w in started] == ["success_stalled"] and "at or below 12%" in started[0].symptom
    rising = [{**HEALTHY, "rollout/success_rate": s} for s in (0.05, 0.2, 0.3, 0.45, 0.6, 0.8, 0.9, 1.0)]
    assert feed(monitor(), rising) == []


def test_replay_ratio_drift_warns_once_the_error_buffer_cannot_explain_it():
    mon = monitor()  # log_interval 1000, learning_starts 1000: judged from 6,000 env steps
    assert feed(mon, [{**HEALTHY, "replay/samples_per_insert": 150.0}] * 4, start=2000) == []
    [warning] = feed(mon, [{**HEALTHY, "replay/samples_per_insert": 150.0}] * 2, start=6000)
    assert warning.check == "replay_ratio_drift" and "150 against its target 256 (41% off)" in warning.symptom


def test_replay_ratio_drift_is_not_judged_over_the_few_inserts_of_a_shard_restored_from_an_early_snapshot():
    # Late in a run, a shard restored from a snapshot of 60 inserts has counted 10 inserts past its
    # warm-up, and the samples its limiter allowed ahead (its error buffer) dwarf them (seen in a chaos run).
    restored = {**HEALTHY, "replay/samples_per_insert": 716.8, "replay/ratio_inserts": 10}
    assert feed(monitor(), [restored] * 4, start=12000) == []
    drifted = {**restored, "replay/ratio_inserts": 20000}
    assert [w.check for w in feed(monitor(), [drifted] * 2, start=12000)] == ["replay_ratio_drift"]


def test_policy_lag_far_beyond_what_the_settings_imply_warns_in_the_fleet_only():
    cfg = load_config("pointmass")
    # 10 (publish) + 1 update per transition x 2 actors x (10 sync + 10 x (1 + 2) chunk and in flight)
    assert expected_policy_lag(cfg) == pytest.approx(90.0)
    lagging = [{**HEALTHY, "learner/policy_lag": 900.0}] * 2
    [warning] = feed(monitor(), lagging)
    assert warning.check == "policy_lag" and "900 updates is 10.0x" in warning.symptom
    assert feed(monitor(fleet=False), lagging) == []


def test_actors_held_back_or_a_learner_starved_for_long_warns():
    mon = monitor("health.starved_seconds=30")
    [warning] = feed(mon, [{"actors/insert_blocked_s": 45.0}])  # between records: only the stall values
    assert warning.check == "actors_starved" and "held back by the rate limiter for 45 s" in warning.symptom
    [warning] = feed(monitor("health.starved_seconds=30"), [{"learner/starved_s": 31.0}])
    assert warning.check == "learner_starved" and "waited 31 s" in warning.symptom


def test_warnings_persist_then_clear_after_three_good_readings_and_can_return():
    mon = monitor()
    bad, good = {**HEALTHY, "train/entropy": -6.0}, HEALTHY
    assert len(feed(mon, [bad, bad])) == 1
    assert feed(mon, [bad, good, good], start=4000) == [] and mon.active() == ["entropy_collapse"]
    feed(mon, [good], start=7000)
    assert mon.active() == []
    again = feed(mon, [bad, bad], start=8000)
    assert len(again) == 1 and [w["first_env_steps"] for w in mon.summary()["warnings"]] == [3000, 9000]
    assert mon.summary()["warnings"][0]["readings"] == 2  # bad readings while it was active


def test_disabled_health_checks_nothing_and_divergence_is_recorded():
    mon = monitor("health.enabled=false")
    assert feed(mon, [{**HEALTHY, "train/entropy": -60.0}] * 5) == [] and mon.values() == {}
    mon.diverged(120, "train/critic_loss", 3000)
    assert mon.summary()["status"] == "diverged"
    assert mon.summary()["diverged"] == {"update": 120, "env_steps": 3000, "what": "train/critic_loss"}


def test_a_return_that_collapses_after_the_run_learned_warns_naming_both_returns_and_steps():
    """Issue 24's seed 3: learned (recent training episodes near -10), then its training episodes
    averaged -12,822. The random phase's returns set the gain; the policy's readings the best; an
    early runaway (-60,000) does not widen the limit."""
    mon = monitor("learner.critic_warmup=0")  # the policy acts from learning_starts (1,000) on
    recent = [-2500, -60000, -40, -12, -10, -11, -900, -12822, -15000]
    records = [{**HEALTHY, "rollout/ep_rew_mean": -1500.0, "rollout/ep_rew_recent": r} for r in recent]
    started = feed(mon, records, start=1000)
    [warning] = [w for w in started if w.check == "return_collapsed"]
    # -900 is within the limit (-10 - 0.5 * 2,490 = -1,255); -12,822 is not, and a second reading confirms it.
    assert warning.first_env_steps == 9000
    assert "the training return fell to -1.5e+04 at 9,000 env steps, far below the best -10 it reached at 5,000 " \
           "(limit -1255)" in warning.symptom
    assert warning.limit_key == "health.collapse_fraction" and "checkpoint.best" in warning.cause
    assert mon.summary()["warnings"][-1]["check"] == "return_collapsed"


def test_an_evaluation_far_below_the_best_one_warns_and_sets_the_final_lines_limit():
    mon = monitor("learner.critic_warmup=0")
    feed(mon, [{**HEALTHY, "rollout/ep_rew_recent": -3000.0}], start=1000)
    evals = [-300.0, -8.0, -5.0, -2000.0, -9000.0]
    started = []
    for i, value in enumerate(evals):
        started += mon.observe(4000 * (i + 1), {"eval/mean_reward": value})
    # One evaluation warns on its own: -2,000 is below -5 - 0.5 * (3,000 - 5); the warning then follows it.
    [warning] = started
    assert warning.check == "return_collapsed" and warning.first_env_steps == 16000
    assert "the evaluation return fell to -9000 at 20,000 env steps, far below the best -5 it reached at 12,000 " \
           "(limit -1502)" in warning.symptom
    # The final evaluation's limit: half the gain to the best evaluation below it.
    assert mon.collapse_limit(-5.0) == pytest.approx(-5.0 - 0.5 * (3000 - 5))


def test_evaluation_noise_near_the_optimum_and_the_random_phase_raise_no_collapse():
    """A learned point-mass policy's evaluations move between -4.5 and -12; random episodes (before the
    policy acts) between -250 and -3,300 (issue 24, a seed of the first trial): neither is a collapse."""
    mon = monitor()  # the preset's critic warm-up: the policy acts from 3,000 env steps on
    random_phase = [{**HEALTHY, "rollout/ep_rew_recent": r} for r in (-252, -3300, -2960)]
    assert feed(mon, random_phase, start=1000) == []
    learned = [{**HEALTHY, "rollout/ep_rew_recent": r, "eval/mean_reward": e}
               for r, e in zip([-2100, -900, -60, -9, -7, -12, -8], [-300, -30, -4.5, -12.0, -6.0, -9.0, -5.0])]
    assert [w.check for w in feed(mon, learned, start=4000)] == []
