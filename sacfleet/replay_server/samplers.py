"""Which slots a sample returns: uniform over filled slots, or proportional to priority^alpha
with importance weights (Schaul et al., 2016)."""

from __future__ import annotations

import numpy as np

from sacfleet.replay_server.sum_tree import SumTree


class UniformSampler:
    prioritized = False

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def on_insert(self, slots: np.ndarray) -> None:
        pass

    def sample(self, num_batches: int, batch_size: int, size: int) -> tuple[np.ndarray, None]:
        """Slots [num_batches, batch_size], uniform over the `size` filled slots."""
        return self.rng.integers(0, size, size=(num_batches, batch_size)), None

    def update(self, slots: np.ndarray, priorities: np.ndarray) -> None:
        raise ValueError("priority updates need replay.sampler=prioritized")

    def state_dict(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_dict(self, arrays: dict[str, np.ndarray], size: int) -> None:
        pass


class PrioritizedSampler:
    """New transitions get the largest priority seen so far, so each is likely sampled once."""

    prioritized = True

    def __init__(self, capacity: int, rng: np.random.Generator, alpha: float = 0.6, beta: float = 0.4,
                 eps: float = 1e-6):
        self.tree = SumTree(capacity)
        self.rng, self.alpha, self.beta, self.eps = rng, alpha, beta, eps
        self.max_priority = 1.0

    def on_insert(self, slots: np.ndarray) -> None:
        self.tree.set(slots, self.max_priority ** self.alpha)

    def sample(self, num_batches: int, batch_size: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Slots and importance weights, each [num_batches, batch_size]. Every batch is stratified
        over the whole priority mass on its own (one draw in each of batch_size equal slices), so
        each batch spans the buffer as a single batch would; stratifying the k x B draws together
        would give batch j only the j-th 1/k of the mass, a narrow window of insertion time.
        Weights are normalised by each batch's largest, so every batch gets the same step size."""
        total = self.tree.total
        u = (np.arange(batch_size) + self.rng.random((num_batches, batch_size))) * (total / batch_size)
        slots = self.tree.sample(u.reshape(-1)).reshape(num_batches, batch_size)
        probs = self.tree.get(slots) / total
        weights = (size * probs) ** (-self.beta)
        return slots, (weights / weights.max(axis=1, keepdims=True)).astype(np.float32)

    def update(self, slots: np.ndarray, priorities: np.ndarray) -> None:
        priorities = np.abs(np.asarray(priorities, dtype=np.float64)) + self.eps
        if not np.all(np.isfinite(priorities)):
            raise ValueError("priorities must be finite")
        self.tree.set(slots, priorities ** self.alpha)
        if priorities.size:
            self.max_priority = max(self.max_priority, float(priorities.max()))

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"leaves": self.tree.tree[self.tree.leaves:self.tree.leaves + self.tree.capacity].copy(),
                "max_priority": np.array([self.max_priority])}

    def load_state_dict(self, arrays: dict[str, np.ndarray], size: int) -> None:
        leaves = arrays["leaves"]
        if leaves.shape != (self.tree.capacity,):
            raise ValueError(f"snapshot priorities have shape {leaves.shape}, expected ({self.tree.capacity},)")
        self.tree.tree[:] = 0
        self.tree.set(np.arange(self.tree.capacity), leaves)
        self.max_priority = float(arrays["max_priority"][0])
