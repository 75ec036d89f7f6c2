"""Versioned msgpack wire format for transition chunks, weight snapshots and replay snapshots.

Every array travels with an explicit dtype and shape; decoding checks the header, the format
version, the dtype whitelist, the byte counts and (for floats) finiteness, and raises only
CodecError. No pickle: a payload from an untrusted peer can at worst be rejected.
"""

from __future__ import annotations

from typing import Any, Mapping

import msgpack
import numpy as np

from sacfleet.common.transitions import InvalidTransitions, TransitionSpec

MAGIC = "sacfleet"
FORMAT_VERSION = 1
KIND_CHUNK, KIND_WEIGHTS, KIND_REPLAY = "chunk", "weights", "replay"

_DTYPES = {name: np.dtype(name) for name in ("float32", "float64", "int64", "int32", "uint8", "bool")}
_META_TYPES = (int, float, str, bool, type(None))


class CodecError(ValueError):
    """A payload is not a valid sacfleet message: wrong magic, version, kind, dtype, shape, size or values."""


# ------------------------------------------------------------------------------------ encode

def _pack_array(array: np.ndarray) -> dict:
    array = np.ascontiguousarray(array).reshape(array.shape)  # ascontiguousarray makes a 0-d array 1-d
    if array.dtype.name not in _DTYPES:
        raise CodecError(f"dtype {array.dtype} cannot be encoded; allowed: {', '.join(_DTYPES)}")
    return {"dtype": array.dtype.name, "shape": list(array.shape), "data": array.tobytes()}


def _encode(kind: str, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> bytes:
    for key, value in meta.items():
        if not isinstance(value, _META_TYPES):
            raise CodecError(f"meta {key!r}: {type(value).__name__} cannot be encoded")
    message = {"magic": MAGIC, "version": FORMAT_VERSION, "kind": kind, "meta": dict(meta),
               "arrays": {name: _pack_array(np.asarray(a)) for name, a in arrays.items()}}
    return msgpack.packb(message, use_bin_type=True)


def encode_chunk(batch: Mapping[str, np.ndarray], spec: TransitionSpec) -> bytes:
    """Encode a batch of transitions; refuses one that does not match `spec`."""
    try:
        spec.validate(batch)
    except InvalidTransitions as exc:
        raise CodecError(f"chunk: {exc}") from None
    return _encode(KIND_CHUNK, batch, {})


def encode_weights(weights: Mapping[str, np.ndarray], version: int) -> bytes:
    return _encode(KIND_WEIGHTS, weights, {"policy_version": int(version)})


def encode_replay(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> bytes:
    return _encode(KIND_REPLAY, arrays, meta)


# ------------------------------------------------------------------------------------ decode

def _unpack_array(name: str, packed: Any) -> np.ndarray:
    if not isinstance(packed, dict) or set(packed) != {"dtype", "shape", "data"}:
        raise CodecError(f"array {name!r}: expected keys dtype, shape, data")
    dtype = _DTYPES.get(packed["dtype"]) if isinstance(packed["dtype"], str) else None
    if dtype is None:
        raise CodecError(f"array {name!r}: dtype {packed['dtype']!r} not allowed; allowed: {', '.join(_DTYPES)}")
    shape = packed["shape"]
    if (not isinstance(shape, list) or len(shape) > 8
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape)):
        raise CodecError(f"array {name!r}: bad shape {shape!r}")
    data = packed["data"]
    if not isinstance(data, bytes):
        raise CodecError(f"array {name!r}: data must be bytes")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise CodecError(f"array {name!r}: {len(data)} bytes for shape {shape} of {dtype}, expected {expected}")
    array = np.frombuffer(data, dtype=dtype).reshape(shape)
    if dtype.name == "bool" and array.size and np.frombuffer(data, np.uint8).max() > 1:
        raise CodecError(f"array {name!r}: bool bytes other than 0 and 1")
    if dtype.kind == "f" and not np.isfinite(array).all():
        raise CodecError(f"array {name!r}: contains NaN or infinite values")
    return array


def _decode(data: bytes, kind: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"expected bytes, got {type(data).__name__}")
    try:
        message = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises many types on corrupt or truncated input
        raise CodecError(f"not a msgpack message ({type(exc).__name__}: {exc})") from None
    if not isinstance(message, dict) or message.get("magic") != MAGIC:
        raise CodecError("not a sacfleet message (missing magic)")
    if message.get("version") != FORMAT_VERSION:
        raise CodecError(f"format version {message.get('version')!r} not supported (this build reads {FORMAT_VERSION})")
    if message.get("kind") != kind:
        raise CodecError(f"expected a {kind!r} message, got {message.get('kind')!r}")
    meta, arrays = message.get("meta"), message.get("arrays")
    if not isinstance(meta, dict) or not all(isinstance(v, _META_TYPES) for v in meta.values()):
        raise CodecError("meta must map names to scalars")
    if not isinstance(arrays, dict) or not all(isinstance(k, str) for k in arrays):
        raise CodecError("arrays must map names to packed arrays")
    return {name: _unpack_array(name, packed) for name, packed in arrays.items()}, meta


def decode_chunk(data: bytes, spec: TransitionSpec) -> dict[str, np.ndarray]:
    """Decode and validate a chunk against `spec`. The arrays are read-only views of `data`."""
    arrays, _ = _decode(data, KIND_CHUNK)
    try:
        spec.validate(arrays)
    except InvalidTransitions as exc:
        raise CodecError(f"chunk: {exc}") from None
    return arrays


def decode_weights(data: bytes) -> tuple[dict[str, np.ndarray], int]:
    arrays, meta = _decode(data, KIND_WEIGHTS)
    version = meta.get("policy_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise CodecError(f"weights: bad policy_version {version!r}")
    return arrays, version


def decode_replay(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    return _decode(data, KIND_REPLAY)
