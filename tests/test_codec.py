"""Wire codec: round trips, rejections, and fuzzing that only CodecError ever escapes."""

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sacfleet.common.codec import (CodecError, decode_chunk, decode_replay, decode_weights, encode_chunk,
                                   encode_replay, encode_weights)
from sacfleet.common.transitions import TransitionSpec
from sacfleet.replay_server import RateLimiter, ReplayTable

SPEC = TransitionSpec(obs_dim=3, act_dim=2)


def make_chunk(n=5, seed=0):
    rng = np.random.default_rng(seed)
    batch = SPEC.empty(n)
    batch["obs"][:] = rng.normal(size=(n, 3))
    batch["next_obs"][:] = rng.normal(size=(n, 3))
    batch["action"][:] = rng.uniform(-1, 1, size=(n, 2))
    batch["reward"][:] = rng.normal(size=n)
    batch["terminated"][:] = rng.random(n) < 0.3
    batch["truncated"][:] = rng.random(n) < 0.3
    batch["policy_version"][:] = 7
    return batch


def test_chunk_round_trip():
    batch = make_chunk()
    decoded = decode_chunk(encode_chunk(batch, SPEC), SPEC)
    assert set(decoded) == set(batch)
    for k in batch:
        assert decoded[k].dtype == batch[k].dtype
        np.testing.assert_array_equal(decoded[k], batch[k])


def test_weights_and_replay_round_trip():
    weights = {"trunk.0.weight": np.ones((4, 3), np.float32), "action_scale": np.array([2.0], np.float32),
               "obs_clip": np.array(5.0, np.float32)}
    out, version = decode_weights(encode_weights(weights, 12))
    assert version == 12
    for name, array in weights.items():  # shapes kept exactly, 0-d included
        assert out[name].shape == array.shape and np.array_equal(out[name], array)
    arrays, meta = decode_replay(encode_replay({"keys": np.arange(4)}, {"inserted": 4, "sampler": "uniform"}))
    assert meta == {"inserted": 4, "sampler": "uniform"} and arrays["keys"].tolist() == [0, 1, 2, 3]


def _message(batch):
    return msgpack.unpackb(encode_chunk(batch, SPEC), raw=False)


def _pack(message):
    return msgpack.packb(message, use_bin_type=True)


def test_rejects_wrong_version_kind_and_magic():
    message = _message(make_chunk())
    with pytest.raises(CodecError, match="version 2 not supported"):
        decode_chunk(_pack({**message, "version": 2}), SPEC)
    with pytest.raises(CodecError, match="expected a 'chunk' message, got 'weights'"):
        decode_chunk(_pack({**message, "kind": "weights"}), SPEC)
    with pytest.raises(CodecError, match="magic"):
        decode_chunk(_pack({**message, "magic": "other"}), SPEC)


def test_rejects_wrong_dtype_shape_and_sizes():
    batch = make_chunk()
    as_f64 = dict(batch, reward=batch["reward"].astype(np.float64))
    with pytest.raises(CodecError, match="reward: dtype float64"):
        decode_chunk(_pack(_message_raw(as_f64)), SPEC)
    with pytest.raises(CodecError, match="obs"):
        decode_chunk(encode_chunk(batch, SPEC), TransitionSpec(obs_dim=4, act_dim=2))
    message = _message(batch)
    message["arrays"]["action"]["shape"] = [5, 3]  # claims more bytes than it carries
    with pytest.raises(CodecError, match="bytes for shape"):
        decode_chunk(_pack(message), SPEC)
    message = _message(batch)
    message["arrays"]["obs"]["dtype"] = "object"
    with pytest.raises(CodecError, match="not allowed"):
        decode_chunk(_pack(message), SPEC)
    short = dict(batch, reward=batch["reward"][:3])
    with pytest.raises(CodecError, match="rows"):
        decode_chunk(_pack(_message_raw(short)), SPEC)


def _message_raw(arrays):
    """A message built without encode_chunk's own validation, as a faulty peer might send."""
    return {"magic": "sacfleet", "version": 1, "kind": "chunk", "meta": {},
            "arrays": {k: {"dtype": v.dtype.name, "shape": list(v.shape), "data": v.tobytes()} for k, v in arrays.items()}}


def test_rejects_non_finite_and_truncated_payloads():
    batch = make_chunk()
    batch["obs"][2, 1] = np.inf
    with pytest.raises(CodecError, match="NaN or infinite"):
        encode_chunk(batch, SPEC)
    with pytest.raises(CodecError, match="NaN or infinite"):
        decode_chunk(_pack(_message_raw(batch)), SPEC)
    payload = encode_chunk(make_chunk(), SPEC)
    for cut in (1, 10, len(payload) // 2, len(payload) - 1):
        with pytest.raises(CodecError):
            decode_chunk(payload[:cut], SPEC)


def _table():
    return ReplayTable(SPEC, capacity=64, limiter=RateLimiter(1.0, 1, error_buffer=1e9), seed=0)


VALID = encode_chunk(make_chunk(), SPEC)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes_raise_only_codec_error(data):
    for decode in (lambda d: decode_chunk(d, SPEC), decode_weights, decode_replay):
        try:
            decode(data)
        except CodecError:
            pass


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8),
       st.integers(0, len(VALID)))
def test_fuzz_mutated_chunks_are_rejected_or_valid_and_never_corrupt_the_buffer(mutations, cut):
    data = bytearray(VALID)
    for pos, byte in mutations:
        data[pos] = byte
    data = bytes(data[:cut] if cut < len(data) else data)
    table = _table()
    table.insert(make_chunk(3, seed=1))
    before = {k: v.copy() for k, v in table.storage.data.items()}
    try:
        n = table.insert_encoded(data)
    except CodecError:
        assert table.size == 3 and table.limiter.inserts == 3
        for k, v in before.items():
            np.testing.assert_array_equal(table.storage.data[k], v)
    else:
        # A mutation that still decodes is a valid chunk of the schema: finite, right shapes.
        assert table.size == 3 + n
        assert all(np.isfinite(table.storage.data[k]).all() for k in ("obs", "next_obs", "action", "reward"))
