"""Vectorised sum-tree: O(log n) priority updates and proportional sampling for whole batches."""

from __future__ import annotations

import numpy as np


class SumTree:
    """Leaf i holds a non-negative priority; sample(u) returns the leaf whose cumulative-sum
    interval contains u (u in [0, total)). All operations take arrays of leaves at once."""

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self.leaves = 1 << max(0, (self.capacity - 1).bit_length())
        self.depth = self.leaves.bit_length() - 1
        self.tree = np.zeros(2 * self.leaves, dtype=np.float64)  # node i has children 2i, 2i+1; root 1

    @property
    def total(self) -> float:
        return float(self.tree[1])

    def get(self, index: np.ndarray) -> np.ndarray:
        return self.tree[self.leaves + np.asarray(index)]

    def set(self, index: np.ndarray, value: np.ndarray) -> None:
        index = np.asarray(index, dtype=np.int64)
        value = np.broadcast_to(np.asarray(value, dtype=np.float64), index.shape)
        if index.size == 0:
            return
        if np.any(value < 0) or not np.all(np.isfinite(value)):
            raise ValueError("priorities must be finite and non-negative")
        # With repeated indices the last assignment wins, as for a sequence of single sets.
        node = self.leaves + index
        self.tree[node] = value
        node = np.unique(node // 2)
        while node[0] >= 1:
            self.tree[node] = self.tree[2 * node] + self.tree[2 * node + 1]
            if node[0] == 1:
                break
            node = np.unique(node // 2)

    def sample(self, u: np.ndarray) -> np.ndarray:
        """Leaf index for each target prefix sum in `u`."""
        u = np.array(u, dtype=np.float64)
        node = np.ones(u.shape, dtype=np.int64)
        for _ in range(self.depth):
            left = 2 * node
            left_sum = self.tree[left]
            go_right = u >= left_sum
            # Float rounding can leave u just past a subtree's sum; never step into an empty child.
            go_right &= self.tree[left + 1] > 0
            u = np.where(go_right, u - left_sum, u)
            node = np.where(go_right, left + 1, left)
        return np.minimum(node - self.leaves, self.capacity - 1)
