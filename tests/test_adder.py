"""The chunk adder env actors send their transitions through: steps in, encoded chunks out, without Ray
or an env."""

import numpy as np

from sacfleet.actors.adder import ChunkAdder
from sacfleet.common.codec import decode_chunk
from sacfleet.common.transitions import TransitionSpec

SPEC = TransitionSpec(3, 2)


def vector_step(num_envs: int, step: int) -> dict:
    batch = SPEC.empty(num_envs)
    batch["obs"][:] = step
    batch["reward"][:] = np.arange(num_envs) + 100 * step
    return batch


def test_a_chunk_holds_t_vector_steps_in_order_and_the_wait_is_timed():
    sent = []
    clock = iter(range(100))
    adder = ChunkAdder(SPEC, chunk_length=3, insert=sent.append, clock=lambda: float(next(clock)))
    for step in range(7):
        adder.add(vector_step(4, step))
    assert len(sent) == 2
    first = decode_chunk(sent[0], SPEC)
    assert len(first["reward"]) == 12  # 3 steps of 4 envs
    np.testing.assert_array_equal(first["reward"], [0, 1, 2, 3, 100, 101, 102, 103, 200, 201, 202, 203])
    assert decode_chunk(sent[1], SPEC)["obs"][0, 0] == 3
    assert adder.seconds_inserting == 2.0  # one clock tick around each insert


def test_flush_sends_the_partial_chunk_and_nothing_when_there_is_none():
    sent = []
    adder = ChunkAdder(SPEC, chunk_length=5, insert=sent.append)
    adder.flush()
    assert sent == []
    for step in range(7):
        adder.add(vector_step(2, step))
    adder.flush()
    assert [len(decode_chunk(p, SPEC)["reward"]) for p in sent] == [10, 4]
    adder.flush()
    assert len(sent) == 2
