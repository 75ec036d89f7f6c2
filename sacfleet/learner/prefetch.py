"""Background prefetch: a thread pulls multi-batch samples, moves each to the learner's device as
one block (one pinned buffer and one non-blocking copy on CUDA) and keeps blocks ready, so updates
run back to back instead of waiting on replay. Needs only torch and numpy."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import torch

from sacfleet.learner.batch import Batch

LEARNER_FIELDS = ("obs", "action", "reward", "next_obs", "terminated")


@dataclass
class Prefetched:
    block: Batch  # k batches, fields [k, B, ...], for SACLearner.update_block
    shard: int
    keys: np.ndarray | None  # [k, B], for priority updates; None for uniform replay


def to_device_block(data: Mapping[str, np.ndarray], weights: np.ndarray | None,
                    device: torch.device) -> Batch:
    """Packed [k, B, ...] sample arrays as one block on `device`: every field is copied once into one
    float32 host buffer (pinned on CUDA, from torch's caching host allocator), which then goes to the
    device in a single non-blocking transfer; the block's fields are contiguous views of it."""
    arrays = {name: data[name] for name in LEARNER_FIELDS}
    if weights is not None:
        arrays["weights"] = weights
    if "discount" in data:  # n-step returns
        arrays["discount"] = data["discount"]
    sizes = [array.size for array in arrays.values()]
    host = torch.empty(sum(sizes), dtype=torch.float32, pin_memory=device.type == "cuda")
    flat = host.numpy()
    offset = 0
    for array, size in zip(arrays.values(), sizes):
        # Into the buffer, cast to float32 on the way (terminated is bool): the one host copy.
        np.copyto(flat[offset:offset + size].reshape(array.shape), array, casting="unsafe")
        offset += size
    packed = host.to(device, non_blocking=True) if device.type == "cuda" else host
    fields = {name: view.view(array.shape)
              for (name, array), view in zip(arrays.items(), packed.split(sizes))}
    return Batch(**fields)


class Prefetcher:
    """`source(should_stop)` returns one sample answer ({"shard", "data", "keys", "weights"}) or None
    when stopping; `get()` hands out one answer's batches at a time, as a block; `depth` blocks wait."""

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
                block = to_device_block(answer["data"], answer["weights"], self.device)
                item = Prefetched(block, answer["shard"], answer["keys"] if self.keep_keys else None)
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
