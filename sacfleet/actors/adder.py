"""Steps in, chunks out: an env actor's transitions gathered for T vector steps, encoded as one chunk
and handed to `insert`, with the time inserts block measured; what is left when the actor stops goes
out too. Needs neither Ray nor an env."""

from __future__ import annotations

import time
from typing import Callable, Mapping

import numpy as np

from sacfleet.common.codec import encode_chunk
from sacfleet.common.transitions import TransitionSpec


class ChunkAdder:
    """`insert(payload)` sends one encoded chunk (the actor's InsertClient.insert, which blocks while
    the replay holds the actor back); `chunk_length`: vector steps per chunk (actors.chunk_length)."""

    def __init__(self, spec: TransitionSpec, chunk_length: int, insert: Callable[[bytes], None],
                 clock: Callable[[], float] = time.monotonic):
        self.spec, self.chunk_length, self.insert, self.clock = spec, chunk_length, insert, clock
        self.steps: list[Mapping[str, np.ndarray]] = []
        self.seconds_inserting = 0.0  # blocked in insert: back-pressure from the replay

    def add(self, transitions: Mapping[str, np.ndarray]) -> None:
        """One vector step's transitions (every field [num_envs, ...]); a full chunk is sent."""
        self.steps.append(transitions)
        if len(self.steps) >= self.chunk_length:
            self._send()

    def flush(self) -> None:
        """Send the partial chunk, if any (the actor stops)."""
        if self.steps:
            self._send()

    def _send(self) -> None:
        steps, self.steps = self.steps, []
        payload = encode_chunk({name: np.concatenate([step[name] for step in steps]) for name in steps[0]}, self.spec)
        t0 = self.clock()
        self.insert(payload)
        self.seconds_inserting += self.clock() - t0
