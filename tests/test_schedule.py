"""When periodic work falls due (driver/schedule.py), for both trainers."""

from sacfleet.common.config import load_config
from sacfleet.driver.schedule import Every, RunSchedule


def test_every_is_due_at_each_multiple_once_however_far_a_counter_jumps():
    every = Every(1000)
    assert [n for n in (999, 1000, 1001, 1999, 3500, 3999, 4000) if every.due(n)] == [1000, 3500, 4000]
    resumed = Every(1000, now=2500)  # a resumed run counts on from where it is
    assert not resumed.due(2999) and resumed.due(3000)


def test_every_zero_is_off_and_unaligned_counts_from_the_last_run():
    assert not any(Every(0).due(n) for n in (0, 10**9))
    wall = Every(60.0, now=5.0, aligned=False)
    assert not wall.due(64.9) and wall.due(65.5) and not wall.due(125.0) and wall.due(125.5)


def test_a_run_schedule_skips_the_evaluation_at_the_last_step_and_checkpoints_on_either_clock():
    cfg = load_config("pointmass", ["train.total_env_steps=2000", "eval.interval=1000", "train.log_interval=500",
                                    "checkpoint.interval=100", "checkpoint.interval_s=30"])
    schedule = RunSchedule(cfg)
    assert schedule.evaluation(1000) and not schedule.evaluation(2000)  # the final evaluation stands in
    assert schedule.log(500) and not schedule.log(900) and schedule.log(1000)
    assert schedule.checkpoint(updates=100, wall=1.0)
    assert schedule.checkpoint(updates=150, wall=31.5)  # 30 s passed first
    assert schedule.checkpoint(updates=200, wall=41.0)  # then 100 updates: the seconds count again from here,
    assert not schedule.checkpoint(updates=250, wall=65.0)  # so 61.5 s is not a due time any more
    assert schedule.checkpoint(updates=250, wall=71.0)
