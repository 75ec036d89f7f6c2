"""The learner's fast path: the losses compiled with torch.compile and, on CUDA, a block of k whole
updates (losses, backward passes, optimizer steps, Polyak averaging) captured once in a CUDA graph
and replayed for every block, so that k small-network updates cost one launch instead of thousands."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable

import torch

from sacfleet.learner.sac import Batch, Losses

WARMUP_UPDATES = 3  # eager (compiled) blocks before capture: compilation and optimizer state happen there
MAX_GRAPHS = 16  # block shapes captured: a block of k <= learner.prefetch_batches batches, with or without weights


def compile_losses(losses: Losses) -> Losses:
    return Losses(*(torch.compile(fn, dynamic=False) for fn in dataclasses.astuple(losses)))


class CudaGraphStep:
    """Runs `step(block)` (k updates, one per batch of the block) from static input tensors: a few
    warm-up calls on a side stream, then, for each block shape, one capture, and for every block a copy
    into that shape's static inputs and a replay. Shapes beyond MAX_GRAPHS (or a capture this torch
    build cannot make) run `step` uncaptured."""

    def __init__(self, step: Callable[[Batch], tuple[torch.Tensor, torch.Tensor]]):
        self.step = step
        self.reset()

    def reset(self) -> None:
        self.graphs: dict[tuple, _Captured] = {}
        self.warmed: set[tuple] = set()
        self.warmup_left = WARMUP_UPDATES
        self.failed = False

    def __call__(self, block: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        tensors = block.tensors()
        shape = tuple((name, tuple(tensor.shape)) for name, tensor in tensors.items())
        captured = self.graphs.get(shape)
        if captured is None:
            if self.failed or len(self.graphs) >= MAX_GRAPHS:
                return self.step(block)
            # Every shape runs once uncaptured before its capture, so that what it needs (a compiled
            # loss with importance weights, say) exists; the first shape a few times.
            if self.warmup_left > 0 or shape not in self.warmed:
                self.warmed.add(shape)
                return self._warmup(block)
            try:
                captured = self.graphs[shape] = self._capture(block)
            except RuntimeError as exc:  # an op this torch build cannot capture: run uncaptured, slower
                warnings.warn(f"learner: CUDA graph capture failed ({exc}); updates run without it")
                self.failed = True
                torch.cuda.synchronize()
                return self.step(block)
        for name, tensor in tensors.items():
            getattr(captured.inputs, name).copy_(tensor, non_blocking=True)
        captured.graph.replay()
        td_error, values = captured.outputs
        # Clones, so that a caller holding them is not overwritten by the next replay.
        return td_error.clone(), values.clone()

    def _warmup(self, block: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        # Warm-up runs on a side stream, as capture requires: it must not see the default
        # stream's pending work as part of its own.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self.step(block)
        torch.cuda.current_stream().wait_stream(side)
        self.warmup_left = max(0, self.warmup_left - 1)
        return out

    def _capture(self, block: Batch) -> "_Captured":
        inputs = Batch(**{name: torch.empty_like(tensor) for name, tensor in block.tensors().items()})
        torch.cuda.synchronize()  # the static inputs exist before the capture reads them
        graph = torch.cuda.CUDAGraph()
        # thread_local: the prefetch thread keeps copying batches to the device while this thread
        # captures; those calls are not part of the graph and must not invalidate it.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            outputs = self.step(inputs)
        return _Captured(graph, inputs, outputs)


@dataclasses.dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: Batch
    outputs: tuple[torch.Tensor, torch.Tensor]
