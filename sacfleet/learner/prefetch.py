"""Background prefetch: a thread pulls multi-batch samples, moves them to the learner's device
(pinned memory and non-blocking copies on CUDA) and keeps batches ready, so updates run back to
back instead of waiting on replay. Needs only torch and numpy."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import torch

from sacfleet.learner.sac import Batch

LEARNER_FIELDS = ("obs", "action", "reward", "next_obs", "terminated")


@dataclass
class Prefetched:
    batch: Batch
    shard: int
    keys: np.ndarray | None  # for priority updates; None for uniform replay


def to_device_batches(data: Mapping[str, np.ndarray], weights: np.ndarray | None,
                      device: torch.device) -> list[Batch]:
    """Split packed [k, B, ...] arrays into k Batches on `device`, one host-to-device copy per field."""
    cuda = device.type == "cuda"

    def move(array: np.ndarray) -> torch.Tensor:
        tensor = torch.tensor(array, dtype=torch.float32)  # copies: sampled arrays may be read-only
        if cuda:
            return tensor.pin_memory().to(device, non_blocking=True)
        return tensor

    fields = {name: move(data[name]).unbind(0) for name in LEARNER_FIELDS}
    w = move(weights).unbind(0) if weights is not None else None
    return [Batch(obs=fields["obs"][i], action=fields["action"][i], reward=fields["reward"][i],
                  next_obs=fields["next_obs"][i], terminated=fields["terminated"][i],
                  weights=None if w is None else w[i]) for i in range(len(fields["obs"]))]


class Prefetcher:
    """`source(should_stop)` returns one sample answer ({"shard", "data", "keys", "weights"}) or None
    when stopping; `get()` hands out its batches one at a time."""

    def __init__(self, source: Callable[[Callable[[], bool]], dict | None], device: torch.device,
                 depth: int, keep_keys: bool):
        self.source, self.device, self.keep_keys = source, device, keep_keys
        self.queue: queue.Queue[Prefetched] = queue.Queue(maxsize=max(1, depth))
        self.stopping = threading.Event()
        self.error: BaseException | None = None
        self.seconds_sampling = 0.0  # time in the source: RPCs, waits on the rate limiter, deserialising
        self.thread = threading.Thread(target=self._run, name="sacfleet-prefetch", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=10)

    def _run(self) -> None:
        try:
            while not self.stopping.is_set():
                t0 = time.monotonic()
                answer = self.source(self.stopping.is_set)
                self.seconds_sampling += time.monotonic() - t0
                if answer is None:
                    return
                batches = to_device_batches(answer["data"], answer["weights"], self.device)
                for i, batch in enumerate(batches):
                    keys = answer["keys"][i] if self.keep_keys else None
                    item = Prefetched(batch, answer["shard"], keys)
                    while not self.stopping.is_set():
                        try:
                            self.queue.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
        except BaseException as exc:  # handed to the update thread by get()
            self.error = exc

    def get(self, timeout: float) -> Prefetched | None:
        """The next batch, or None if none arrived within `timeout`; re-raises the thread's error."""
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            if self.error is not None:
                raise self.error
            return None
