"""The learner's newest policy as actors pull it: snapshots taken by the update thread without waiting
for the device, encoded once per version on the first pull, never when diverged. Snapshots need only
torch and numpy; encoding needs msgpack."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

from sacfleet.learner.sac import SACLearner


@dataclass
class Snapshot:
    version: int  # learner updates when it was taken
    weights: dict[str, torch.Tensor]  # the actor's state, in host memory (pinned for a CUDA learner)
    first_bad: torch.Tensor  # the learner's DivergenceWatch.first_bad then: >= 0 means diverged
    copied: torch.cuda.Event | None  # recorded after the copies from a CUDA device; None on CPU

    def ready(self) -> bool:
        return self.copied is None or self.copied.query()

    def wait(self) -> None:
        if self.copied is not None:
            self.copied.synchronize()


class PolicyPublisher:
    """`snapshot()` (update thread, between updates) copies the actor's parameters to host memory:
    on CUDA asynchronously, so the update thread queues the next updates instead of waiting for the
    device and then encoding. `latest()` (any thread) waits for the newest snapshot's copy, checks it,
    and encodes it once; a learner publishing faster than actors pull encodes only what is pulled."""

    def __init__(self, learner: SACLearner, interval: int):
        self.learner = learner
        self.interval = interval  # learner.publish_interval
        self.newest: Snapshot | None = None
        self.encoded: tuple[int, bytes] | None = None  # (version, encoded weights) of the newest good snapshot
        self.encode_lock = threading.Lock()
        self.snapshots = 0
        self.encodes = 0
        self.pulls = 0  # weights handed to actors: each sends the encoded bytes once more
        self.refused = False  # a snapshot was taken after the learner diverged: it was not published

    def after_block(self, updates_before: int) -> None:
        """Snapshot if a publish interval ended in the block of updates just made (blocks of k
        updates: the publish follows the block)."""
        if self.learner.updates // self.interval > updates_before // self.interval:
            self.snapshot()

    def snapshot(self) -> None:
        learner = self.learner
        if not learner.policy_ready:  # in the critic warm-up: actors keep acting at random
            return
        cuda = learner.device.type == "cuda"

        def host(tensor: torch.Tensor) -> torch.Tensor:
            if not cuda:
                return tensor.detach().clone()
            return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True).copy_(tensor, non_blocking=True)

        weights = {name: host(tensor) for name, tensor in learner.actor.state_dict().items()}
        first_bad = host(learner.divergence.first_bad)
        copied = None
        if cuda:
            copied = torch.cuda.Event()
            copied.record()
        self.newest = Snapshot(learner.updates, weights, first_bad, copied)  # one assignment: readers see either
        self.snapshots += 1

    def latest(self, have_version: int) -> tuple[int, bytes] | None:
        """(version, encoded weights) of the newest good snapshot if other than `have_version`, else
        None. Other, not newer: a learner recovered from a checkpoint publishes an older version."""
        with self.encode_lock:
            newest = self.newest
            if newest is not None and (self.encoded is None or self.encoded[0] != newest.version):
                self._encode(newest)
            encoded = self.encoded
        if encoded is None or encoded[0] == have_version:
            return None
        self.pulls += 1
        return encoded

    def _encode(self, snap: Snapshot) -> None:
        # Imported here: the learner bench snapshots without ever encoding, on machines without msgpack.
        from sacfleet.common.codec import encode_weights

        snap.wait()
        weights = {name: tensor.numpy() for name, tensor in snap.weights.items()}
        if int(snap.first_bad) >= 0 or not all(np.isfinite(array).all() for array in weights.values()):
            self.refused = True  # the update thread raises LearnerDiverged; actors keep the last good one
            return
        self.encoded = (snap.version, encode_weights(weights, snap.version))
        self.encodes += 1

    def diverged(self) -> bool:
        """Whether a snapshot was refused, or the newest one whose copy has finished shows the learner
        diverged (no waiting): the update thread checks this between blocks, and syncs
        (check_finite) only once it is true."""
        snap = self.newest
        return self.refused or (snap is not None and snap.ready() and int(snap.first_bad) >= 0)

    @property
    def bytes_per_pull(self) -> int:
        encoded = self.encoded
        return len(encoded[1]) if encoded else 0
