"""The transition schema: field names, dtypes and shapes, and the check every batch passes
before it may touch a replay buffer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

FIELDS = ("obs", "action", "reward", "next_obs", "terminated", "truncated", "policy_version")


class InvalidTransitions(ValueError):
    """A batch of transitions does not match the schema (keys, dtype, shape or values)."""


@dataclass(frozen=True)
class TransitionSpec:
    obs_dim: int
    act_dim: int

    def fields(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """name -> (dtype, shape of one transition)."""
        f32, obs, act = np.dtype(np.float32), (self.obs_dim,), (self.act_dim,)
        return {
            "obs": (f32, obs),
            "action": (f32, act),
            "reward": (f32, ()),
            "next_obs": (f32, obs),
            "terminated": (np.dtype(np.bool_), ()),
            "truncated": (np.dtype(np.bool_), ()),
            "policy_version": (np.dtype(np.int64), ()),
        }

    def bytes_per_transition(self) -> int:
        return sum(dtype.itemsize * int(np.prod(shape)) for dtype, shape in self.fields().values())

    def empty(self, n: int) -> dict[str, np.ndarray]:
        return {name: np.zeros((n, *shape), dtype) for name, (dtype, shape) in self.fields().items()}

    def validate(self, batch: Mapping[str, np.ndarray]) -> int:
        """Return the number of transitions in `batch`, or raise InvalidTransitions saying why."""
        if not isinstance(batch, Mapping):
            raise InvalidTransitions(f"expected a mapping of fields, got {type(batch).__name__}")
        expected = self.fields()
        missing = sorted(set(expected) - set(batch))
        extra = sorted(set(batch) - set(expected))
        if missing or extra:
            raise InvalidTransitions(f"fields do not match the schema: missing {missing}, unexpected {extra}")
        count = None
        for name, (dtype, shape) in expected.items():
            array = batch[name]
            if not isinstance(array, np.ndarray):
                raise InvalidTransitions(f"{name}: expected a numpy array, got {type(array).__name__}")
            if array.dtype != dtype:
                raise InvalidTransitions(f"{name}: dtype {array.dtype}, expected {dtype}")
            if array.ndim != 1 + len(shape) or tuple(array.shape[1:]) != shape:
                raise InvalidTransitions(f"{name}: shape {array.shape}, expected (n, {', '.join(map(str, shape))})"
                                         .replace(", )", ")"))
            if count is None:
                count = array.shape[0]
            elif array.shape[0] != count:
                raise InvalidTransitions(f"{name}: {array.shape[0]} rows, but obs has {count}")
            if dtype.kind == "f" and not np.isfinite(array).all():
                raise InvalidTransitions(f"{name}: contains NaN or infinite values")
        if count == 0:
            raise InvalidTransitions("empty batch: no transitions")
        return int(count)
