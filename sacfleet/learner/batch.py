"""What the learner updates from: a batch of transitions as device tensors, or a block of k batches
stacked along a leading axis (one update per batch). Needs only torch and numpy."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch


@dataclass
class Batch:
    obs: torch.Tensor
    action: torch.Tensor
    reward: torch.Tensor
    next_obs: torch.Tensor
    terminated: torch.Tensor  # float 0/1; truncation is deliberately absent: it is not a terminal state
    weights: torch.Tensor | None = None  # importance weights from prioritized replay
    discount: torch.Tensor | None = None  # gamma^k of each n-step transition (replay.n_step > 1); else gamma

    @classmethod
    def from_numpy(cls, data: Mapping[str, np.ndarray], weights: np.ndarray | None,
                   device: torch.device) -> "Batch":
        def to(array: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(array, device=device, dtype=torch.float32)

        return cls(obs=to(data["obs"]), action=to(data["action"]), reward=to(data["reward"]),
                   next_obs=to(data["next_obs"]), terminated=to(data["terminated"]),
                   weights=None if weights is None else to(weights),
                   discount=to(data["discount"]) if "discount" in data else None)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The fields that are set (weights only with prioritized replay), by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    def __getitem__(self, i: int) -> "Batch":
        """Batch i of a block: a Batch whose fields carry a leading dimension of k batches."""
        return Batch(**{name: tensor[i] for name, tensor in self.tensors().items()})

    @classmethod
    def stack(cls, batches: list["Batch"]) -> "Batch":
        """Batches of one shape as a block (copies)."""
        return cls(**{name: torch.stack([b.tensors()[name] for b in batches]) for name in batches[0].tensors()})

    def as_block(self) -> "Batch":
        """This batch as a block of one (views, no copies)."""
        return Batch(**{name: tensor.unsqueeze(0) for name, tensor in self.tensors().items()})

    @property
    def num_batches(self) -> int:
        """k, for a block."""
        return self.obs.shape[0]
