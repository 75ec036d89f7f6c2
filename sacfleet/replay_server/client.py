"""Clients of the Ray replay shards: `InsertClient` routes an actor's chunks round-robin with a bound
on unacknowledged requests (back-pressure), `SampleClient` keeps one multi-batch sample request in
flight per shard for the learner. Both wait on the rate limiter with a timeout that names what starves."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import ray
from ray.exceptions import RayActorError

from sacfleet.replay_server.rate_limiter import RateLimiterTimeout


@dataclass
class _Pending:
    ref: Any
    shard: int
    payload: bytes
    since: float  # when the chunk was first sent


SHARD_DOWN_RETRY_S = 0.2
PRIORITY_CHECK_EVERY = 16  # priority updates between checks of their results
MAX_PRIORITY_UPDATES_IN_FLIGHT = 256


class InsertClient:
    """Chunks go to the shards in turn; at most `max_in_flight` are unacknowledged, so a slow or
    rate-limited shard stalls the actor instead of queueing chunks in memory. A chunk the limiter
    refuses is re-sent to the same shard after the delay the shard suggests. With `rotate=False` every
    chunk goes to `first_shard`, so that whole episodes stay in one shard (hindsight relabeling)."""

    def __init__(self, shards: Sequence, max_in_flight: int, timeout_s: float, *, first_shard: int = 0,
                 rotate: bool = True, should_stop: Callable[[], bool] = lambda: False):
        self.shards = list(shards)
        self.rotate = rotate
        self.max_in_flight = max_in_flight
        self.timeout_s = timeout_s
        self.should_stop = should_stop
        self.next_shard = first_shard % len(self.shards)
        self.pending: deque[_Pending] = deque()
        self.inserted = 0
        self.seconds_blocked = 0.0  # time spent waiting for acknowledgements: back-pressure
        self.waiting_since: float | None = None  # the caller is held in insert() since then

    def insert(self, payload: bytes) -> None:
        if len(self.pending) >= self.max_in_flight:
            self.waiting_since = time.monotonic()
        try:
            while len(self.pending) >= self.max_in_flight and not self.should_stop():
                self._settle_oldest()
        finally:
            self.waiting_since = None
        shard = self.next_shard
        if self.rotate:
            self.next_shard = (shard + 1) % len(self.shards)
        self.pending.append(_Pending(self.shards[shard].insert.remote(payload), shard, payload, time.monotonic()))

    def oldest_pending_seconds(self) -> float:
        """How long the oldest unacknowledged chunk has waited: long waits mean the rate limiter
        holds this actor back because nothing samples."""
        try:  # read from another thread while run() may pop it
            return time.monotonic() - self.pending[0].since
        except IndexError:
            return 0.0

    def waiting(self) -> bool:
        """Whether the caller is held in insert() by back-pressure now (read from another thread)."""
        return self.waiting_since is not None

    def flush(self) -> None:
        """Wait for every chunk in flight; once `should_stop` is true, refused chunks are dropped."""
        while self.pending:
            self._settle_oldest()

    def _settle_oldest(self) -> None:
        pending = self.pending[0]
        t0 = time.monotonic()
        try:
            down = False
            try:
                result = ray.get(pending.ref)  # a malformed chunk raises the shard's CodecError here
            except RayActorError as exc:
                down = True
                # The shard died; Ray restarts it and the driver restores it. The chunk may have died
                # with it, so it is sent again (the restored shard holds only what its snapshot held).
                result = {"ok": False, "retry_after": SHARD_DOWN_RETRY_S,
                          "reason": f"replay shard {pending.shard} is down ({type(exc).__name__})"}
            if result["ok"]:
                self.pending.popleft()
                self.inserted += result["inserted"]
                return
            if self.should_stop():
                self.pending.popleft()
                return
            # A shard that is down gets no timeout here: the driver recovers it, or stops the run.
            if not down and time.monotonic() - pending.since > self.timeout_s:
                raise RateLimiterTimeout(f"insert into replay shard {pending.shard} blocked for "
                                         f"{self.timeout_s:g}s (replay.rate_limit_timeout_s): {result['reason']}")
            time.sleep(result["retry_after"])
            pending.ref = self.shards[pending.shard].insert.remote(pending.payload)
        finally:
            self.seconds_blocked += time.monotonic() - t0


class SampleClient:
    """One multi-batch request in flight per shard; `next()` returns the first answer that carries
    batches. Shards that refuse (rate limited) are asked again after their suggested delay."""

    def __init__(self, shards: Sequence, batches_per_request: int, batch_size: int, timeout_s: float):
        self.shards = list(shards)
        self.batches_per_request = batches_per_request
        self.batch_size = batch_size
        self.timeout_s = timeout_s
        self.outstanding: dict[Any, int] = {}  # ref -> shard
        self.not_before = [0.0] * len(self.shards)
        self.waiting_since: float | None = None  # since when every shard has refused: for the timeout
        self.sampled = False  # a batch has come: later waits are not the warm-up
        self.last_reason = ""
        self.priority_updates: list = []  # refs of priority updates not yet seen to succeed

    def _request(self, now: float) -> None:
        busy = set(self.outstanding.values())
        for shard, handle in enumerate(self.shards):
            if shard not in busy and now >= self.not_before[shard]:
                self.outstanding[handle.sample.remote(self.batches_per_request, self.batch_size)] = shard

    def next(self, should_stop: Callable[[], bool]) -> dict | None:
        """The next answer with batches ({"shard", "data", "keys", "weights"}), or None once `should_stop`."""
        while not should_stop():
            now = time.monotonic()
            self._request(now)
            if not self.outstanding:
                time.sleep(max(0.0, min(min(self.not_before) - now, 0.1)))
                continue
            ready, _ = ray.wait(list(self.outstanding), num_returns=1, timeout=0.1)
            if not ready:
                continue
            shard = self.outstanding.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except RayActorError as exc:  # the shard died: ask again once Ray and the driver have it back
                result = {"ok": False, "retry_after": SHARD_DOWN_RETRY_S,
                          "reason": f"replay shard {shard} is down ({type(exc).__name__})"}
            if result["ok"]:
                self.waiting_since = None
                self.sampled = True
                return result
            now = time.monotonic()
            self.not_before[shard] = now + result["retry_after"]
            self.last_reason = result["reason"]
            if self.waiting_since is None:
                self.waiting_since = now
            elif now - self.waiting_since > self.timeout_s:
                raise RateLimiterTimeout(f"sampling blocked for {self.timeout_s:g}s (replay.rate_limit_timeout_s): "
                                         f"{self.last_reason}")
        return None

    @property
    def starved_since(self) -> float | None:
        """Since when the learner has waited for a batch without a break, once the warm-up is over."""
        return self.waiting_since if self.sampled else None

    def update_priorities(self, shard: int, keys, priorities) -> None:
        """Send new priorities without waiting for them; a shard's error surfaces here a few calls
        later (as a RayTaskError naming its cause), never silently dropped."""
        self.priority_updates.append(self.shards[shard].update_priorities.remote(keys, priorities))
        if len(self.priority_updates) >= PRIORITY_CHECK_EVERY:
            done, self.priority_updates = ray.wait(self.priority_updates, num_returns=len(self.priority_updates),
                                                   timeout=0)
            for ref in done:
                _settle_priority_update(ref)
            # A shard that answers none of them holds the learner back here rather than queue them forever.
            while len(self.priority_updates) > MAX_PRIORITY_UPDATES_IN_FLIGHT:
                _settle_priority_update(self.priority_updates.pop(0))


def _settle_priority_update(ref) -> None:
    try:
        ray.get(ref)
    except RayActorError:  # the shard died: the snapshot it is restored from has its own priorities
        pass
