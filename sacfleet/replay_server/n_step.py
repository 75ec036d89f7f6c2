"""n-step returns inside a shard: which stored transition follows each one in its env's episode, and the
n-step transition a sampled one becomes, computed at sample time (replay.n_step).

  reward   = sum_{j<k} gamma^j r_j        next_obs = s_k        discount = gamma^k
  terminated = the k-th step's terminated

where k <= n steps are summed: the sum ends early at the episode's last step (a termination, which the
learner does not bootstrap from, or a time-limit truncation, which it does, from the state reached) and at
the newest step stored so far. Chains follow `episode` ids, so they never cross into another episode or
env, and an episode's steps are linked in insertion order: the ring overwrites a transition only after
every one inserted before it, so a stored transition's successors are stored too.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

NO_NEXT = -1


class NStepIndex:
    """For every filled slot, the slot of the next step of its episode (NO_NEXT until that step is
    stored, and for an episode's last step), kept as transitions are written."""

    def __init__(self, capacity: int, n: int, gamma: float):
        if n < 1:
            raise ValueError(f"replay.n_step must be >= 1, got {n}")
        self.n, self.gamma = int(n), float(gamma)
        self.next_slot = np.full(capacity, NO_NEXT, dtype=np.int64)
        # Each unfinished episode's newest step: episode id -> (slot, key). The key tells whether the
        # slot still holds that step: an env actor that stopped mid-episode never finishes it.
        self.open: dict[int, tuple[int, int]] = {}
        self.prune_at = 1024

    def on_insert(self, slots: np.ndarray, keys: np.ndarray, episode: np.ndarray, done: np.ndarray,
                  stored_keys: np.ndarray) -> None:
        """Link transitions written to `slots` (in insertion order, with insertion numbers `keys`) to
        their episodes' previous steps; `stored_keys` are the storage's keys after the write."""
        self.next_slot[slots] = NO_NEXT
        for slot, key, ep, end in zip(slots.tolist(), keys.tolist(), episode.tolist(), done.tolist()):
            previous = self.open.pop(ep, None)
            if previous is not None and stored_keys[previous[0]] == previous[1]:
                self.next_slot[previous[0]] = slot
            if not end:
                self.open[ep] = (slot, key)
        if len(self.open) > self.prune_at:  # forget steps the ring has overwritten (amortized)
            self.open = {ep: (slot, key) for ep, (slot, key) in self.open.items() if stored_keys[slot] == key}
            self.prune_at = 2 * len(self.open) + 1024

    def rebuild(self, slots: np.ndarray, keys: np.ndarray, episode: np.ndarray, done: np.ndarray,
                stored_keys: np.ndarray) -> None:
        """Index restored storage: the filled `slots`, with their insertion numbers `keys`."""
        self.next_slot[:] = NO_NEXT
        self.open.clear()
        order = np.argsort(keys, kind="stable")
        self.on_insert(slots[order], keys[order], episode[order], done[order], stored_keys)

    def returns(self, slots: np.ndarray, data: dict[str, np.ndarray], stored: Mapping[str, np.ndarray],
                next_obs_fields: tuple[str, ...]) -> None:
        """Turn the transitions gathered from `slots` into `data` into n-step ones, in place, adding
        `discount` (gamma^k per row)."""
        reward = data["reward"].astype(np.float64)
        done = stored["terminated"][slots] | stored["truncated"][slots]
        last = slots.copy()
        steps = np.ones(slots.shape, dtype=np.int64)
        going = ~done
        for j in range(1, self.n):
            following = self.next_slot[last]
            going &= following >= 0
            if not going.any():
                break
            rows = np.flatnonzero(going)
            step = following[rows]
            reward[rows] += self.gamma ** j * stored["reward"][step]
            last[rows] = step
            steps[rows] += 1
            going[rows] = ~(stored["terminated"][step] | stored["truncated"][step])
        moved = np.flatnonzero(last != slots)
        if moved.size:
            far = last[moved]
            for name in next_obs_fields:
                data[name][moved] = np.take(stored[name], far, axis=0)
            data["terminated"][moved] = stored["terminated"][far]
            data["truncated"][moved] = stored["truncated"][far]
        data["reward"] = reward.astype(np.float32)
        data["discount"] = (self.gamma ** steps).astype(np.float32)
