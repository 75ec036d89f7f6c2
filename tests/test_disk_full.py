"""A run directory on a filesystem that fills up mid-run (a small tmpfs): checkpoint sets that cannot
be written are reported and retried, the run stops in order past checkpoint.max_write_failures, and
the last set written before the disk filled still resumes."""

import pytest

from sacfleet.common.config import load_config
from sacfleet.common.envs import describe_env
from sacfleet.driver.checkpoint_files import kept_files, load_checkpoint
from sacfleet.driver.errors import RunStopped
from sacfleet.driver.resume import load_resume
from sacfleet.driver.train_inline import train_inline

SHORT = ["train.total_env_steps=1600", "train.learning_starts=400", "train.log_interval=400",
         "learner.hidden_sizes=[32, 32]", "learner.batch_size=64", "replay.samples_per_insert=64",
         "eval.interval=0", "eval.final_episodes=2", "learner.num_threads=1", "checkpoint.interval=300",
         "checkpoint.interval_s=0", "checkpoint.max_write_failures=2"]


def test_an_inline_run_on_a_disk_that_fills_stops_in_order_and_its_last_set_resumes(small_disk):
    run_dir = small_disk.path / "run"
    lines = []

    def echo(line: str) -> None:
        lines.append(line)
        if line.startswith("steps") and " 800/" in line.replace(",", ""):  # after the set at 300 updates
            small_disk.fill()

    with pytest.raises(RunStopped) as stopped:
        train_inline(load_config("pointmass", SHORT), run_dir, echo=echo)
    text = "\n".join(lines)
    # Two sets in a row not written (at 600 and 900 updates), each said with the file, its size and why;
    # the run stops, and its final checkpoint cannot be written either.
    failures = [line for line in lines if line.startswith("checkpoint not written (")]
    assert len(failures) == 2 and "final checkpoint not written (3 in a row" in text, text
    assert failures[1].startswith("checkpoint not written (2 in a row; checkpoint.max_write_failures=2): cannot "
                                  "write "), failures
    assert "No space left on device; 0 bytes free there" in failures[1]
    kept = load_checkpoint(run_dir / "checkpoints")
    assert kept["learner"]["updates"] == 300
    assert f"the last good checkpoint (300 updates, {kept['env_steps']} env steps)" in failures[1]
    # Metrics and events that cannot be written are said once each, however many records fail.
    assert 1 <= text.count("cannot write tensorboard") + text.count("cannot write metrics.jsonl") <= 2, text
    assert text.count("cannot write tensorboard") <= 1 and text.count("cannot write metrics.jsonl") <= 1
    # The final line names the cause; the summary could not be written, and says so.
    done = [line for line in lines if line.startswith("done (")]
    assert len(done) == 1 and done[0].startswith("done (checkpoints could not be written 2 times in a row: "), done
    assert "summary NOT written (cannot write" in done[0]
    assert "checkpoints could not be written 2 times in a row" in str(stopped.value)
    # No partial files left behind.
    assert not list(small_disk.path.rglob("*.tmp")) and not list(small_disk.path.rglob(".*.staged"))

    small_disk.free()
    assert [path.name for path in kept_files(run_dir / "checkpoints")] == ["checkpoint.pt"]
    cfg = load_config("pointmass", [*SHORT, "train.total_env_steps=3000"])
    point = load_resume(run_dir, cfg, describe_env(cfg.env))
    assert point.env_steps == kept["env_steps"] and point.skipped == ""
    assert point.replay["shards"][0]["inserts"] == kept["env_steps"]
