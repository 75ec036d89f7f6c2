"""Speed-ups wrapped around the learner from outside, as LeanRL wraps its update: loss functions compiled
with torch.compile and, on CUDA, a step over a block of inputs (for the learner: k whole updates with
their backward passes, optimizer steps and Polyak averaging) captured once per input shape in a CUDA
graph and replayed, so that k small-network updates cost one launch instead of thousands.

Nothing here knows SAC: functions come in a dataclass, a step takes a dataclass of tensors and returns
tensors, and optimizers are re-armed for capture whenever their state is loaded."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable

import torch

WARMUP_UPDATES = 3  # eager (compiled) blocks before capture: compilation and optimizer state happen there
MAX_GRAPHS = 48  # captures: a block of k <= learner.prefetch_batches batches, with or without weights, per
# place in the learner.policy_delay cycle


def resolve_compile(requested: str, device: torch.device) -> bool:
    """learner.compile: `auto` compiles (and graph-captures) on CUDA only, where launch overhead
    dominates small networks; on CPU compiling buys little and costs a long first update."""
    if requested not in ("auto", "on", "off"):
        raise ValueError(f"learner.compile: {requested!r} is not allowed; choose one of: auto, on, off")
    return requested == "on" or (requested == "auto" and device.type == "cuda")


def accelerate(learner):
    """Compile `learner.losses` (a dataclass of loss functions) and, on CUDA, run `learner.block_step`
    through a CudaGraphStep whose optimizers (`learner.optimizers`) keep their state on the device and
    are re-armed, and the graphs captured again, whenever a checkpoint is loaded into them. Returns
    the learner, changed in place."""
    learner.losses = compile_functions(learner.losses)
    learner.compiled = True
    if learner.device.type == "cuda":
        graph = CudaGraphStep(learner.block_step)
        learner.block_step = graph
        for optim in learner.optimizers:
            arm_for_capture(optim)

            def rearm(optim, graph=graph):
                arm_for_capture(optim)
                graph.reset()  # the optimizers' state tensors are new: capture again

            optim.register_load_state_dict_post_hook(rearm)
    return learner


def compile_functions(functions):
    """A dataclass of functions with each one compiled (static shapes: a block shape is captured once)."""
    return dataclasses.replace(functions, **{field.name: torch.compile(getattr(functions, field.name), dynamic=False)
                                             for field in dataclasses.fields(functions)})


def arm_for_capture(optim: torch.optim.Optimizer) -> None:
    """Capturable: the optimizer keeps its step counts on the device, as a CUDA graph needs."""
    for group in optim.param_groups:
        group["capturable"] = True
        for param in group["params"]:
            state = optim.state.get(param)
            if state and "step" in state:
                state["step"] = torch.as_tensor(state["step"], dtype=torch.float32, device=param.device)


def tensors_of(inputs) -> dict[str, torch.Tensor]:
    """The tensor fields of a dataclass that are set, by name."""
    return {field.name: getattr(inputs, field.name) for field in dataclasses.fields(inputs)
            if getattr(inputs, field.name) is not None}


class CudaGraphStep:
    """Runs `step(inputs, *static)` (a dataclass of tensors and hashable Python values in, a tuple of
    tensors out) from static input tensors: a few warm-up calls on a side stream, then, for each input
    shape and `static` values, one capture, and for every call a copy into that capture's static inputs
    and a replay. Captures beyond MAX_GRAPHS (or a capture this torch build cannot make) run `step`
    uncaptured."""

    def __init__(self, step: Callable):
        self.step = step
        self.reset()

    def reset(self) -> None:
        self.graphs: dict[tuple, _Captured] = {}
        self.warmed: set[tuple] = set()
        self.warmup_left = WARMUP_UPDATES
        self.failed = False

    def __call__(self, inputs, *static) -> tuple[torch.Tensor, ...]:
        tensors = tensors_of(inputs)
        shape = (tuple((name, tuple(tensor.shape)) for name, tensor in tensors.items()), static)
        captured = self.graphs.get(shape)
        if captured is None:
            if self.failed or len(self.graphs) >= MAX_GRAPHS:
                return self.step(inputs, *static)
            # Every shape runs once uncaptured before its capture, so that what it needs (a compiled
            # loss with importance weights, say) exists; the first shape a few times.
            if self.warmup_left > 0 or shape not in self.warmed:
                self.warmed.add(shape)
                return self._warmup(inputs, static)
            try:
                captured = self.graphs[shape] = self._capture(inputs, static)
            except RuntimeError as exc:  # an op this torch build cannot capture: run uncaptured, slower
                warnings.warn(f"learner: CUDA graph capture failed ({exc}); updates run without it")
                self.failed = True
                torch.cuda.synchronize()
                return self.step(inputs, *static)
        for name, tensor in tensors.items():
            getattr(captured.inputs, name).copy_(tensor, non_blocking=True)
        captured.graph.replay()
        # Clones, so that a caller holding them is not overwritten by the next replay.
        return tuple(output.clone() for output in captured.outputs)

    def _warmup(self, inputs, static: tuple) -> tuple[torch.Tensor, ...]:
        # Warm-up runs on a side stream, as capture requires: it must not see the default
        # stream's pending work as part of its own.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self.step(inputs, *static)
        torch.cuda.current_stream().wait_stream(side)
        self.warmup_left = max(0, self.warmup_left - 1)
        return out

    def _capture(self, inputs, static: tuple) -> "_Captured":
        static_inputs = dataclasses.replace(inputs, **{name: torch.empty_like(tensor)
                                                       for name, tensor in tensors_of(inputs).items()})
        torch.cuda.synchronize()  # the static inputs exist before the capture reads them
        graph = torch.cuda.CUDAGraph()
        # thread_local: the prefetch thread keeps copying batches to the device while this thread
        # captures; those calls are not part of the graph and must not invalidate it.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            outputs = self.step(static_inputs, *static)
        return _Captured(graph, static_inputs, outputs)


@dataclasses.dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: object
    outputs: tuple[torch.Tensor, ...]
