"""Checkpoint sets kept as generations: rotation, the replay files each kept set needs, and readers
that take the newest set that reads back whole (a file cut short, a flipped bit, a replay file gone)."""

import numpy as np
import pytest

from sacfleet.cli import main
from sacfleet.common.config import load_config
from sacfleet.common.envs import describe_env
from sacfleet.common.transitions import TransitionSpec
from sacfleet.driver.checkpoint_files import (CheckpointError, CheckpointSets, check_replay_files, kept_files,
                                              load_checkpoint, newest_checkpoint)
from sacfleet.driver.resume import load_resume
from sacfleet.replay_server import RateLimiter, ReplayTable
from sacfleet.replay_server.snapshot_files import SnapshotWriter, entry_files

SPEC = TransitionSpec(obs_dim=3, act_dim=2)


def chunk(start: int, n: int) -> dict:
    batch = SPEC.empty(n)
    batch["reward"][:] = np.arange(start, start + n)
    return batch


def written_sets(directory, keep: int, count: int) -> tuple[CheckpointSets, list[dict]]:
    """`count` sets committed one after another, each after 5 more inserts into a 12-slot ring of
    4-slot segments (so each increment rewrites some segments and keeps others)."""
    table = ReplayTable(SPEC, capacity=12, limiter=RateLimiter(1.0, 1, error_buffer=1e12), segment_slots=4)
    writer, sets, manifests = SnapshotWriter(directory, 1), CheckpointSets(directory, keep), []
    for generation in range(1, count + 1):
        table.insert(chunk(5 * (generation - 1), 5))
        writer.next_generation()
        writer.write_shard(0, table.begin_snapshot(), table.snapshot_segment)
        manifests.append(writer.manifest())
        sets.commit({"updates": generation}, {"env_steps": 5 * generation}, manifests[-1])
    return sets, manifests


def replay_files(directory) -> set[str]:
    return {p.relative_to(directory).as_posix() for p in (directory / "replay").rglob("*.msgpack")}


def listed(manifest: dict) -> set[str]:
    return {ref["file"] for entry in manifest["shards"] for ref in entry_files(entry)}


def test_the_newest_sets_are_kept_with_every_replay_file_they_list_and_no_other(tmp_path):
    _, manifests = written_sets(tmp_path, keep=2, count=4)
    assert [p.name for p in kept_files(tmp_path)] == ["checkpoint.pt", "checkpoint.1.pt"]
    assert load_checkpoint(tmp_path / "checkpoint.pt")["learner"] == {"updates": 4}
    assert load_checkpoint(tmp_path / "checkpoint.1.pt")["learner"] == {"updates": 3}
    assert replay_files(tmp_path) == listed(manifests[3]) | listed(manifests[2])
    assert listed(manifests[1]) - listed(manifests[2]) - listed(manifests[3])  # some files did go

    three, manifests = written_sets(tmp_path / "three", keep=3, count=4)
    assert [p.name for p in kept_files(tmp_path / "three")] == ["checkpoint.pt", "checkpoint.1.pt", "checkpoint.2.pt"]
    assert replay_files(tmp_path / "three") == listed(manifests[3]) | listed(manifests[2]) | listed(manifests[1])
    three.amend({"updates": 40}, {"env_steps": 20}, manifests[3])  # the final evaluation: the newest set only
    assert [load_checkpoint(p)["learner"]["updates"] for p in kept_files(tmp_path / "three")] == [40, 3, 2]


def cut_in_half(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def flip_a_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [cut_in_half, flip_a_byte])
def test_a_reader_skips_a_damaged_newest_set_and_says_why(tmp_path, damage):
    written_sets(tmp_path, keep=2, count=3)
    damage(tmp_path / "checkpoint.pt")
    found = newest_checkpoint(tmp_path)
    assert found.path.name == "checkpoint.1.pt" and found.state["learner"] == {"updates": 2}
    assert f"checkpoint {tmp_path / 'checkpoint.pt'} is damaged" in found.note()
    assert "using checkpoint.1.pt (2 updates, 10 env steps)" in found.note()
    assert load_checkpoint(tmp_path)["learner"] == {"updates": 2}  # what `sacfleet eval DIR` reads

    damage(tmp_path / "checkpoint.1.pt")
    with pytest.raises(CheckpointError, match="none of the 2 checkpoint sets in .* reads back whole: checkpoint .*"
                                              "checkpoint.pt is damaged.*checkpoint.1.pt is damaged"):
        newest_checkpoint(tmp_path)


def test_a_set_whose_replay_file_is_gone_is_skipped_by_a_reader_that_needs_the_replay(tmp_path):
    _, manifests = written_sets(tmp_path, keep=2, count=3)
    only_newest = sorted(listed(manifests[2]) - listed(manifests[1]))
    (tmp_path / only_newest[0]).unlink()
    found = newest_checkpoint(tmp_path, check_replay_files)
    assert found.path.name == "checkpoint.1.pt" and f"{only_newest[0]} cannot be read" in found.note()
    assert newest_checkpoint(tmp_path).path.name == "checkpoint.pt"  # the learner's state alone is whole


def test_a_resume_falls_back_to_the_previous_set_and_then_sets_the_damaged_one_aside(tmp_path, capsys):
    from sacfleet.driver.train_inline import train_inline

    short = ["train.total_env_steps=1200", "train.learning_starts=400", "learner.hidden_sizes=[32, 32]",
             "learner.batch_size=64", "replay.samples_per_insert=64", "eval.interval=0", "eval.final_episodes=1",
             "learner.num_threads=1", "checkpoint.interval=500", "checkpoint.interval_s=0", "checkpoint.keep=2"]
    run_dir = tmp_path / "run"
    train_inline(load_config("pointmass", short), run_dir, echo=lambda line: None)
    checkpoints = run_dir / "checkpoints"
    newest, previous = [load_checkpoint(p)["env_steps"] for p in kept_files(checkpoints)]
    assert newest == 1200 and 800 < previous < 1200  # at 500 updates, one per env step after 400
    cut_in_half(checkpoints / "checkpoint.pt")
    assert main(["eval", "--checkpoint", str(run_dir), "--episodes", "1"]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint at {previous:,} env steps" in out and "skipped 1 newer checkpoint set" in out, out

    cfg = load_config("pointmass", [*short, "train.total_env_steps=2000"])
    point = load_resume(run_dir, cfg, describe_env(cfg.env))
    assert point.env_steps == previous and point.path.name == "checkpoint.1.pt"
    assert "is damaged (cut short or corrupted)" in point.skipped and "using checkpoint.1.pt" in point.skipped
    assert point.replay["shards"][0]["inserts"] == previous and point.damaged == [checkpoints / "checkpoint.pt"]

    # The resumed run's sets: the damaged file goes aside, the set it resumed from stays kept.
    from sacfleet.driver.checkpointing import FleetCheckpointer

    checkpointer = FleetCheckpointer(cfg, checkpoints, point.replay, point.learner_state, point.kept_replay,
                                     point.damaged)
    extra = {key: value for key, value in load_checkpoint(point.path).items() if key not in ("version", "learner")}
    assert (checkpoints / "checkpoint.pt.damaged").is_file() and not (checkpoints / "checkpoint.pt").exists()
    checkpointer.commit(point.learner_state, {**extra, "env_steps": 1500})
    assert [load_checkpoint(p)["env_steps"] for p in kept_files(checkpoints)] == [1500, previous]
    assert load_resume(run_dir, cfg, describe_env(cfg.env)).skipped == ""

    for path in kept_files(checkpoints):
        cut_in_half(path)
    with pytest.raises(CheckpointError, match="none of the 2 checkpoint sets .* reads back whole"):
        load_resume(run_dir, cfg, describe_env(cfg.env))
