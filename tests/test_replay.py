"""Replay storage, samplers, sum-tree, rate limiter and snapshots."""

import numpy as np
import pytest

from sacfleet.common.codec import CodecError
from sacfleet.common.transitions import InvalidTransitions, TransitionSpec
from sacfleet.driver.checkpoint_files import CheckpointSets, load_checkpoint
from sacfleet.replay_server import (RateLimited, RateLimiter, RateLimiterTimeout, ReplayMemoryError, ReplayTable,
                                    RingStorage, estimate_bytes, wait_until_allowed)
from sacfleet.replay_server.snapshot_files import SnapshotWriter, entry_files, read_shard
from sacfleet.replay_server.storage import check_fits
from sacfleet.replay_server.sum_tree import SumTree
from sacfleet.replay_server.table import snapshot_parts

SPEC = TransitionSpec(obs_dim=3, act_dim=2)


def chunk(start, n, spec=SPEC):
    """n transitions whose reward is their global index, so tests can tell them apart."""
    batch = spec.empty(n)
    ids = np.arange(start, start + n)
    batch["reward"][:] = ids
    batch["obs"][:] = ids[:, None]
    batch["policy_version"][:] = ids
    return batch


def free_limiter(min_size=1):
    return RateLimiter(1e-6 + 1.0, min_size, error_buffer=1e12)


def test_ring_wraps_around_and_overwrites_oldest():
    storage = RingStorage(SPEC, capacity=5)
    storage.insert(chunk(0, 3))
    storage.insert(chunk(3, 4))  # 7 inserted into 5 slots: slots hold 5, 6, 2, 3, 4
    assert storage.size == 5 and storage.inserted == 7
    np.testing.assert_array_equal(storage.data["reward"], [5, 6, 2, 3, 4])
    np.testing.assert_array_equal(storage.keys, [5, 6, 2, 3, 4])
    storage.insert(chunk(7, 12))  # larger than capacity: only the newest 5 survive
    assert sorted(storage.data["reward"].tolist()) == [14, 15, 16, 17, 18]
    assert storage.inserted == 19


def test_uniform_sampling_returns_only_filled_slots():
    table = ReplayTable(SPEC, capacity=100, limiter=free_limiter(), seed=0)
    table.insert(chunk(0, 7))
    sample = table.sample(num_batches=50, batch_size=20)
    assert sample.data["reward"].shape == (50, 20)
    assert sample.data["obs"].shape == (50, 20, 3)
    values = np.unique(sample.data["reward"])
    np.testing.assert_array_equal(values, np.arange(7))  # every filled slot, nothing else
    assert sample.weights is None


def test_invalid_batch_is_rejected_and_storage_unchanged():
    table = ReplayTable(SPEC, capacity=10, limiter=free_limiter(), seed=0)
    table.insert(chunk(0, 4))
    before = {k: v.copy() for k, v in table.storage.data.items()}
    bad = chunk(4, 3)
    bad["next_obs"][1, 0] = np.nan
    with pytest.raises(InvalidTransitions, match="NaN"):
        table.insert(bad)
    wrong_shape = chunk(4, 3)
    wrong_shape["action"] = np.zeros((3, 5), np.float32)
    with pytest.raises(InvalidTransitions, match="action"):
        table.insert(wrong_shape)
    wrong_dtype = chunk(4, 3)
    wrong_dtype["reward"] = wrong_dtype["reward"].astype(np.float64)
    with pytest.raises(InvalidTransitions, match="dtype"):
        table.insert(wrong_dtype)
    assert table.size == 4 and table.limiter.inserts == 4
    for k, v in before.items():
        np.testing.assert_array_equal(table.storage.data[k], v)


def test_sum_tree_sampling_is_proportional_to_priority():
    tree = SumTree(10)  # not a power of two on purpose
    priorities = np.array([1, 2, 3, 4, 0, 10, 0.5, 0, 7, 2.5])
    tree.set(np.arange(10), priorities)
    assert tree.total == pytest.approx(priorities.sum())
    rng = np.random.default_rng(1234)
    n = 200_000
    counts = np.bincount(tree.sample(rng.random(n) * tree.total), minlength=10)
    assert counts[4] == 0 and counts[7] == 0
    expected = priorities / priorities.sum() * n
    keep = expected > 0
    chi2 = (((counts - expected)[keep]) ** 2 / expected[keep]).sum()
    assert chi2 < 27.9  # 99.9th percentile of chi-square with 7 degrees of freedom


def test_sum_tree_vectorised_set_with_repeated_indices_matches_sequential():
    tree, ref = SumTree(8), SumTree(8)
    idx, val = np.array([3, 5, 3, 0]), np.array([1.0, 2.0, 4.0, 0.5])
    tree.set(idx, val)
    for i, v in zip(idx, val):
        ref.set(np.array([i]), np.array([v]))
    np.testing.assert_array_equal(tree.tree, ref.tree)
    assert tree.total == 6.5
    with pytest.raises(ValueError):
        tree.set(np.array([1]), np.array([-1.0]))


def test_prioritized_sampling_weights_and_priority_updates():
    table = ReplayTable(SPEC, capacity=16, limiter=free_limiter(), sampler="prioritized", seed=3,
                        priority_alpha=1.0, priority_beta=1.0, priority_eps=1e-9)
    table.insert(chunk(0, 4))
    table.update_priorities(np.arange(4), np.array([1.0, 1.0, 1.0, 97.0]))
    sample = table.sample(num_batches=100, batch_size=100)
    share = np.mean(sample.data["reward"] == 3)
    assert share == pytest.approx(0.97, abs=0.01)
    # Rarely sampled items get the largest importance weight (1 after normalising), frequent ones less.
    w = sample.weights.reshape(-1)
    rewards = sample.data["reward"].reshape(-1)
    assert w.max() == pytest.approx(1.0)
    assert w[rewards == 3].max() == pytest.approx(1 / 97, rel=1e-3)


def _quarter_counts(rewards, n):
    return np.bincount((np.asarray(rewards) * 4 // n).astype(int), minlength=4)


@pytest.mark.parametrize("skewed", [False, True])
def test_every_batch_of_a_multi_batch_prioritized_request_spans_the_buffer(skewed):
    """Batch j of a k-batch request must not come from the j-th 1/k of the priority mass (a narrow
    window of insertion time): each spans the buffer as a single batch does."""
    n, k, b = 10_000, 8, 256
    table = ReplayTable(SPEC, capacity=n, limiter=free_limiter(), sampler="prioritized", seed=7)
    table.insert(chunk(0, n))  # reward = insertion index
    if skewed:  # priorities rising with age, as after a run of TD errors: still every region sampled
        table.update_priorities(np.arange(n), np.linspace(1.0, 5.0, n))
    single = table.sample(1, b).data["reward"][0]
    multi = table.sample(k, b).data["reward"]
    assert multi.shape == (k, b)
    lo, hi = single.min(), single.max()
    for j, batch in enumerate(multi):
        assert batch.min() <= lo + 0.05 * n and batch.max() >= hi - 0.05 * n, (j, batch.min(), batch.max())
        # Every quarter of the buffer appears in every batch in about the share a single batch gives it.
        np.testing.assert_allclose(_quarter_counts(batch, n), _quarter_counts(single, n), atol=0.06 * b)


def test_importance_weights_are_normalised_within_each_batch():
    n, beta = 1_000, 0.7
    table = ReplayTable(SPEC, capacity=n, limiter=free_limiter(), sampler="prioritized", seed=2,
                        priority_alpha=1.0, priority_beta=beta, priority_eps=1e-9)
    table.insert(chunk(0, n))
    priorities = np.random.default_rng(0).uniform(0.1, 10.0, n)
    table.update_priorities(np.arange(n), priorities)
    sample = table.sample(8, 128)
    probs = priorities[sample.keys] / priorities.sum()
    expected = (n * probs) ** -beta
    expected /= expected.max(axis=1, keepdims=True)
    np.testing.assert_allclose(sample.weights, expected, rtol=1e-5)
    # Each batch's largest weight is 1: every batch takes the same effective step size.
    np.testing.assert_allclose(sample.weights.max(axis=1), 1.0)


def test_priority_update_for_overwritten_slot_is_ignored():
    table = ReplayTable(SPEC, capacity=4, limiter=free_limiter(), sampler="prioritized", seed=0)
    table.insert(chunk(0, 4))
    stale_keys = np.array([0, 1])
    table.insert(chunk(4, 2))  # overwrites slots 0 and 1 (keys 4 and 5)
    assert table.update_priorities(stale_keys, np.array([100.0, 100.0])) == 0
    assert table.update_priorities(np.array([4, 2]), np.array([5.0, 5.0])) == 2


def test_rate_limiter_blocks_sampling_until_min_size_and_names_what_is_starved():
    limiter = RateLimiter(samples_per_insert=2.0, min_size_to_sample=10, error_buffer=8)
    limiter.record_insert(6)
    verdict = limiter.check_sample(4)
    assert not verdict.ok and "4 more inserted items" in verdict.reason and verdict.retry_after > 0
    limiter.record_insert(4)
    assert limiter.check_sample(4).ok


@pytest.mark.parametrize("spi,batch,insert", [(256.0, 256, 1), (64.0, 128, 4), (0.5, 32, 8)])
def test_rate_limiter_holds_the_ratio_under_greedy_producer_and_consumer(spi, batch, insert):
    limiter = RateLimiter.for_requests(spi, min_size_to_sample=100, insert_size=insert, sample_size=batch)
    rng = np.random.default_rng(0)
    for _ in range(20_000):
        # Each side acts whenever allowed, in random order: the limiter alone enforces the ratio.
        if rng.random() < 0.5:
            if limiter.check_insert(insert).ok:
                limiter.record_insert(insert)
        elif limiter.check_sample(batch).ok:
            limiter.record_sample(batch)
        assert limiter.check_insert(insert).ok or limiter.check_sample(batch).ok, "deadlock"
        if limiter.inserts > 100:
            drift = limiter.samples - spi * (limiter.inserts - 100)
            assert abs(drift) <= limiter.error_buffer + batch
    assert limiter.ratio() == pytest.approx(spi, rel=0.05)


def test_rate_limiter_rejects_error_buffers_that_could_deadlock():
    with pytest.raises(ValueError, match="error_buffer"):
        RateLimiter.for_requests(256.0, 1000, insert_size=8, sample_size=256, error_buffer=300)
    limiter = RateLimiter(1.0, 1, error_buffer=10)
    with pytest.raises(ValueError, match="never"):
        limiter.check_sample(50)


def test_wait_until_allowed_times_out_with_the_reason():
    limiter = RateLimiter(1.0, min_size_to_sample=5, error_buffer=4)
    clock = [0.0]
    with pytest.raises(RateLimiterTimeout, match="learner sample blocked for 2s: sampling waits for 5 more"):
        wait_until_allowed(lambda: limiter.check_sample(1), 2.0, "learner sample",
                           sleep=lambda s: clock.__setitem__(0, clock[0] + s), clock=lambda: clock[0])
    # Allowed at once: returns without sleeping.
    limiter.record_insert(5)
    wait_until_allowed(lambda: limiter.check_sample(1), 2.0, "sample", sleep=pytest.fail)


def test_table_raises_rate_limited_and_stores_nothing():
    limiter = RateLimiter(samples_per_insert=1.0, min_size_to_sample=2, error_buffer=2)
    table = ReplayTable(SPEC, capacity=10, limiter=limiter)
    with pytest.raises(RateLimited) as info:
        table.sample(1, 1)
    assert "more inserted items" in str(info.value)
    table.insert(chunk(0, 2))
    table.insert(chunk(2, 2))
    with pytest.raises(RateLimited):
        table.insert(chunk(4, 2))  # 2 inserts ahead of the learner plus 2 more exceeds the buffer
    assert table.size == 4


@pytest.mark.parametrize("sampler", ["uniform", "prioritized"])
def test_snapshot_round_trip(sampler):
    table = ReplayTable(SPEC, capacity=8, limiter=free_limiter(), sampler=sampler, seed=0, segment_slots=3)
    table.insert(chunk(0, 11))  # wrapped
    if sampler == "prioritized":
        table.update_priorities(np.array([8, 9]), np.array([3.0, 9.0]))
    table.sample(2, 4)
    header, segments = snapshot_parts(table)
    assert len(segments) == 3  # 8 slots in segments of 3
    restored = ReplayTable(SPEC, capacity=8, limiter=free_limiter(), sampler=sampler, seed=1, segment_slots=3)
    restored.restore(header, iter(segments))
    for k, v in table.storage.data.items():
        np.testing.assert_array_equal(restored.storage.data[k], v)
    np.testing.assert_array_equal(restored.storage.keys, table.storage.keys)
    assert restored.storage.inserted == 11
    assert restored.limiter.state_dict() == table.limiter.state_dict()
    if sampler == "prioritized":
        np.testing.assert_allclose(restored.sampler.tree.tree, table.sampler.tree.tree)
    restored.insert(chunk(11, 1))  # keeps going from the right slot
    assert restored.storage.data["reward"][11 % 8] == 11


def test_snapshot_for_other_shapes_is_refused_and_contents_kept():
    table = ReplayTable(SPEC, capacity=8, limiter=free_limiter())
    table.insert(chunk(0, 3))
    with pytest.raises(ValueError, match="restore needs an empty table; this one holds 3"):
        table.restore(*snapshot_parts(table))
    assert table.size == 3 and table.storage.data["reward"][:3].tolist() == [0, 1, 2]

    empty = ReplayTable(SPEC, capacity=8, limiter=free_limiter())
    other = ReplayTable(TransitionSpec(4, 2), capacity=8, limiter=free_limiter())
    other.insert(chunk(0, 5, TransitionSpec(4, 2)))
    with pytest.raises(ValueError, match="obs_dim=4"):
        empty.restore(*snapshot_parts(other))
    with pytest.raises(CodecError):
        empty.restore(b"garbage", [])
    with pytest.raises(ValueError, match="capacity"):
        empty.restore(*snapshot_parts(ReplayTable(SPEC, capacity=16, limiter=free_limiter())))
    header, segments = snapshot_parts(table)
    with pytest.raises(ValueError, match=r"segments \[0\] are missing"):
        empty.restore(header, [])
    with pytest.raises(CodecError):
        empty.restore(header, [segments[0][:-5]])
    assert empty.size == 0
    empty.restore(header, segments)  # still usable after the refusals
    assert empty.storage.data["reward"][:3].tolist() == [0, 1, 2]


def test_snapshots_take_only_the_segments_changed_since_the_last():
    table = ReplayTable(SPEC, capacity=10, limiter=free_limiter(), segment_slots=4)
    table.insert(chunk(0, 6))
    first = table.begin_snapshot()
    assert first["dirty"] == [0, 1] and first["num_segments"] == 2 and first["inserts"] == 6
    files = {j: table.snapshot_segment(j) for j in first["dirty"]}
    table.insert(chunk(6, 1))  # slot 6: segment 1 only
    second = table.begin_snapshot()
    assert second["dirty"] == [1] and table.begin_snapshot()["dirty"] == []
    files[1] = table.snapshot_segment(1)
    table.insert(chunk(7, 5))  # slots 7..9 then 0..1: wraps into segment 0; segment 2 is new
    third = table.begin_snapshot()
    assert third["dirty"] == [0, 1, 2] and third["num_segments"] == 3
    files.update({j: table.snapshot_segment(j) for j in third["dirty"]})
    table.mark_dirty([2])  # a failed save: taken again next time
    assert table.begin_snapshot()["dirty"] == [2]

    restored = ReplayTable(SPEC, capacity=10, limiter=free_limiter(), segment_slots=4)
    restored.restore(third["header"], (files[j] for j in range(3)))
    np.testing.assert_array_equal(restored.storage.data["reward"], table.storage.data["reward"])
    assert restored.storage.inserted == 12 and restored.begin_snapshot()["dirty"] == []


def test_memory_estimate_refuses_a_capacity_that_does_not_fit():
    per_item = SPEC.bytes_per_transition() + 8
    assert estimate_bytes(SPEC, 1000) == per_item * 1000
    assert estimate_bytes(SPEC, 1000, prioritized=True) == per_item * 1000 + 2 * 1024 * 8
    with pytest.raises(ReplayMemoryError, match=r"replay.capacity=1,000,000 needs .* GiB.*lower replay.capacity"):
        check_fits(SPEC, 1_000_000, False, 0.8, available=10 * 2**20)
    check_fits(SPEC, 1_000, False, 0.8, available=10 * 2**20)
    with pytest.raises(ReplayMemoryError):
        RingStorage(TransitionSpec(obs_dim=10**6, act_dim=1), capacity=10**6)


def test_keep_freed_memory_tunes_glibc_malloc():
    import platform

    from sacfleet.replay_server.storage import keep_freed_memory

    # CI and the development machine run glibc; elsewhere the call must be a harmless no-op.
    assert keep_freed_memory() is (platform.libc_ver()[0] == "glibc")


def test_snapshot_writer_writes_changed_segments_and_commits_sets_whole(tmp_path):
    table = ReplayTable(SPEC, capacity=12, limiter=free_limiter(), segment_slots=4)
    writer = SnapshotWriter(tmp_path, 1)
    table.insert(chunk(0, 10))
    writer.next_generation()
    first = writer.write_shard(0, table.begin_snapshot(), table.snapshot_segment)
    assert [ref["file"] for ref in first["segments"]] == [f"replay/shard0/seg{j:05d}-g1.msgpack" for j in range(3)]
    sets = CheckpointSets(tmp_path, keep=1)
    sets.commit({"updates": 1}, {}, writer.manifest())

    table.insert(chunk(10, 1))  # slot 10: only segment 2 changes
    writer.next_generation()
    second = writer.write_shard(0, table.begin_snapshot(), table.snapshot_segment)
    assert second["segments"][:2] == first["segments"][:2]
    assert second["segments"][2]["file"] == "replay/shard0/seg00002-g2.msgpack" and second["inserts"] == 11
    # Until the new set is committed, every file of the committed one is still there.
    assert all((tmp_path / ref["file"]).is_file() for ref in entry_files(first))
    sets.commit({"updates": 2}, {}, writer.manifest())
    on_disk = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "replay").rglob("*.msgpack"))
    assert on_disk == sorted(ref["file"] for ref in entry_files(second))

    state = load_checkpoint(tmp_path)
    assert state["learner"] == {"updates": 2}
    restored = ReplayTable(SPEC, capacity=12, limiter=free_limiter(), segment_slots=4)
    restored.restore(*read_shard(tmp_path, state["replay"]["shards"][0]))
    np.testing.assert_array_equal(restored.storage.data["reward"], table.storage.data["reward"])
    assert restored.storage.inserted == 11
