"""The learner's fast path: the losses compiled with torch.compile and, on CUDA, the whole update
(losses, backward passes, optimizer steps, Polyak averaging) captured once in a CUDA graph and
replayed for every batch, so that a small-network update costs one launch instead of hundreds."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable

import torch

from sacfleet.learner.sac import Batch, Losses

WARMUP_UPDATES = 3  # eager (compiled) updates before capture: compilation and optimizer state happen there


def compile_losses(losses: Losses) -> Losses:
    return Losses(*(torch.compile(fn, dynamic=False) for fn in dataclasses.astuple(losses)))


class CudaGraphStep:
    """Runs `step(batch)` on static input tensors: a few warm-up updates on a side stream, then one
    capture, then a copy of each batch into the static inputs and a replay. A batch of another
    shape (or with importance weights where there were none) runs `step` uncaptured."""

    def __init__(self, step: Callable[[Batch], tuple[torch.Tensor, torch.Tensor]]):
        self.step = step
        self.reset()

    def reset(self) -> None:
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: Batch | None = None
        self.outputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.warmup_left = WARMUP_UPDATES
        self.failed = False

    def __call__(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.warmup_left > 0:
            return self._warmup(batch)
        if self.failed or not self._fits(batch):
            return self.step(batch)
        for name, tensor in _fields(batch):
            getattr(self.static, name).copy_(tensor, non_blocking=True)
        if self.graph is None:
            try:
                self._capture()
            except RuntimeError as exc:  # an op this torch build cannot capture: run uncaptured, slower
                warnings.warn(f"learner: CUDA graph capture failed ({exc}); updates run without it")
                self.failed = True
                return self.step(batch)
        self.graph.replay()
        td_error, values = self.outputs
        # Clones, so that a caller holding them is not overwritten by the next replay.
        return td_error.clone(), values.clone()

    def _warmup(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        # Warm-up runs on a side stream, as capture requires: it must not see the default
        # stream's pending work as part of its own.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self.step(batch)
        torch.cuda.current_stream().wait_stream(side)
        self.warmup_left -= 1
        if self.warmup_left == 0:
            self.static = Batch(**{name: tensor.clone() for name, tensor in _fields(batch)})
        return out

    def _fits(self, batch: Batch) -> bool:
        mine, theirs = dict(_fields(self.static)), dict(_fields(batch))
        return mine.keys() == theirs.keys() and all(mine[k].shape == theirs[k].shape for k in mine)

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.outputs = self.step(self.static)
        self.graph = graph


def _fields(batch: Batch) -> list[tuple[str, torch.Tensor]]:
    return [(f.name, getattr(batch, f.name)) for f in dataclasses.fields(batch)
            if getattr(batch, f.name) is not None]
