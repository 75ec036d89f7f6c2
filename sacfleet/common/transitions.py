"""The transition schema: field names, dtypes and shapes, and the check every batch passes
before it may touch a replay buffer.

A flat observation is stored as `obs` and `next_obs`. A Dict observation stores each key as its own
field, `obs/<key>` and `next_obs/<key>`; the learner sees them concatenated (`learner_view`). Every
transition carries `episode`, an id shared by the transitions of one env's episode (hindsight
relabeling draws goals within it; n-step returns follow it)."""

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
    obs_keys: tuple[tuple[str, int], ...] = ()  # (key, width) of a Dict observation, in network order

    def __post_init__(self):
        if self.obs_keys and sum(width for _, width in self.obs_keys) != self.obs_dim:
            raise ValueError(f"obs_keys {self.obs_keys} do not add up to obs_dim={self.obs_dim}")

    @classmethod
    def for_env(cls, env_info) -> "TransitionSpec":
        return cls(env_info.obs_dim, env_info.act_dim, tuple(tuple(pair) for pair in env_info.obs_keys))

    def obs_fields(self, prefix: str) -> dict[str, int]:
        """Stored field name -> width for `prefix` ("obs" or "next_obs")."""
        if not self.obs_keys:
            return {prefix: self.obs_dim}
        return {f"{prefix}/{key}": width for key, width in self.obs_keys}

    def fields(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """name -> (dtype, shape of one transition)."""
        f32, i64, act = np.dtype(np.float32), np.dtype(np.int64), (self.act_dim,)
        fields = {name: (f32, (width,)) for name, width in self.obs_fields("obs").items()}
        fields.update({"action": (f32, act), "reward": (f32, ())})
        fields.update({name: (f32, (width,)) for name, width in self.obs_fields("next_obs").items()})
        fields.update({"terminated": (np.dtype(np.bool_), ()), "truncated": (np.dtype(np.bool_), ()),
                       "policy_version": (i64, ()), "episode": (i64, ())})
        return fields

    def learner_view(self, data: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The fields as the learner reads them: a Dict observation's keys concatenated into `obs`
        and `next_obs` (in `obs_keys` order); flat observations pass through."""
        view = {name: array for name, array in data.items() if "/" not in name and name != "episode"}
        if not self.obs_keys:
            return view
        for prefix in ("obs", "next_obs"):
            view[prefix] = np.concatenate([data[name] for name in self.obs_fields(prefix)], axis=-1)
        return view

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
