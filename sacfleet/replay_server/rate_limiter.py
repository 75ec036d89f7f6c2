"""Reverb-style samples-per-insert rate limiter that keeps the replay ratio fixed.

It never blocks: `check_insert` and `check_sample` return a Verdict saying "go", or "not now,
retry after t seconds, because ...". `wait_until_allowed` turns that into a bounded wait that
raises RateLimiterTimeout naming what is starved. With an error buffer at least half of
(largest sample request + samples_per_insert x largest insert), one side can always proceed,
so the two cannot deadlock; `RateLimiter.for_requests` sizes and checks that.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Verdict:
    ok: bool
    retry_after: float = 0.0  # seconds; an estimate from the observed rates of the other side
    reason: str = ""


class RateLimited(Exception):
    """Raised by a table operation the limiter does not allow now; carries the Verdict."""

    def __init__(self, verdict: Verdict):
        super().__init__(verdict.reason)
        self.verdict = verdict


class RateLimiterTimeout(TimeoutError):
    """A blocked insert or sample waited longer than its timeout; the message says what starved it."""


class _RateMeter:
    """Exponential moving average of items per second."""

    def __init__(self, clock: Callable[[], float]):
        self.clock, self.last, self.rate = clock, None, 0.0

    def add(self, n: int) -> None:
        now = self.clock()
        if self.last is not None and now > self.last:
            instant = n / (now - self.last)
            self.rate = instant if self.rate == 0 else 0.9 * self.rate + 0.1 * instant
        self.last = now

    def seconds_for(self, n: float) -> float:
        if self.rate <= 0:
            return 0.01
        return min(1.0, max(0.001, n / self.rate))


class RateLimiter:
    """Allows sampling once `min_size_to_sample` items were inserted, then holds
    samples ~= samples_per_insert * (inserts - min_size_to_sample) within +-error_buffer."""

    def __init__(self, samples_per_insert: float, min_size_to_sample: int, error_buffer: float,
                 clock: Callable[[], float] = time.monotonic):
        if samples_per_insert <= 0:
            raise ValueError(f"samples_per_insert must be > 0, got {samples_per_insert}")
        if min_size_to_sample < 1:
            raise ValueError(f"min_size_to_sample must be >= 1, got {min_size_to_sample}")
        if error_buffer < max(1.0, samples_per_insert):
            raise ValueError(f"error_buffer {error_buffer} must be >= max(1, samples_per_insert={samples_per_insert})")
        self.samples_per_insert = float(samples_per_insert)
        self.min_size_to_sample = int(min_size_to_sample)
        self.error_buffer = float(error_buffer)
        offset = self.samples_per_insert * self.min_size_to_sample
        self.min_diff, self.max_diff = offset - self.error_buffer, offset + self.error_buffer
        self.inserts = 0
        self.samples = 0
        self._insert_rate, self._sample_rate = _RateMeter(clock), _RateMeter(clock)

    @classmethod
    def for_requests(cls, samples_per_insert: float, min_size_to_sample: int, insert_size: int,
                     sample_size: int, error_buffer: float | None = None, **kwargs) -> "RateLimiter":
        """A limiter that cannot deadlock for inserts of up to `insert_size` items and samples of
        up to `sample_size`; `error_buffer=None` picks twice the smallest safe value."""
        needed = (sample_size + samples_per_insert * insert_size) / 2
        if error_buffer is None:
            error_buffer = max(2 * needed, samples_per_insert, 1.0)
        elif error_buffer < needed:
            raise ValueError(
                f"replay.error_buffer={error_buffer:g} is too small for sample requests of {sample_size} and "
                f"inserts of {insert_size} x samples_per_insert {samples_per_insert:g}: it must be >= {needed:g}, "
                f"or inserts and samples could block each other forever")
        return cls(samples_per_insert, min_size_to_sample, error_buffer, **kwargs)

    @property
    def diff(self) -> float:
        return self.inserts * self.samples_per_insert - self.samples

    def _check_size(self, n: int, cost: float, what: str) -> None:
        if n < 1:
            raise ValueError(f"{what} of {n} items")
        if cost > 2 * self.error_buffer:
            raise ValueError(f"{what} of {n} items can never be allowed: it moves the ratio by {cost:g} samples, "
                             f"more than twice error_buffer={self.error_buffer:g}")

    def check_insert(self, n: int) -> Verdict:
        self._check_size(n, n * self.samples_per_insert, "an insert")
        if self.inserts < self.min_size_to_sample or self.diff + n * self.samples_per_insert <= self.max_diff:
            return Verdict(True)
        needed = self.diff + n * self.samples_per_insert - self.max_diff
        return Verdict(False, self._sample_rate.seconds_for(needed),
                       f"inserts wait for sampling: {math.ceil(needed)} more sampled items needed "
                       f"(inserts {self.inserts}, samples {self.samples}, samples_per_insert {self.samples_per_insert:g}); "
                       f"is the learner running?")

    def check_sample(self, n: int) -> Verdict:
        self._check_size(n, n, "a sample")
        if self.inserts < self.min_size_to_sample:
            needed = self.min_size_to_sample - self.inserts
            return Verdict(False, self._insert_rate.seconds_for(needed),
                           f"sampling waits for {needed} more inserted items to reach min_size_to_sample "
                           f"{self.min_size_to_sample} (inserts {self.inserts}); are the actors running?")
        if self.diff - n >= self.min_diff:
            return Verdict(True)
        needed = math.ceil((self.min_diff - (self.diff - n)) / self.samples_per_insert)
        return Verdict(False, self._insert_rate.seconds_for(needed),
                       f"sampling waits for {needed} more inserted items to keep samples_per_insert "
                       f"{self.samples_per_insert:g} (inserts {self.inserts}, samples {self.samples}); "
                       f"are the actors running?")

    def record_insert(self, n: int) -> None:
        self.inserts += n
        self._insert_rate.add(n)

    def record_sample(self, n: int) -> None:
        self.samples += n
        self._sample_rate.add(n)

    def ratio(self) -> float:
        """Measured samples per insert since sampling became possible (NaN before)."""
        effective = self.inserts - self.min_size_to_sample
        return self.samples / effective if effective > 0 else float("nan")

    def state_dict(self) -> dict:
        return {"inserts": self.inserts, "samples": self.samples}

    def load_state_dict(self, state: dict) -> None:
        self.inserts, self.samples = int(state["inserts"]), int(state["samples"])


def wait_until_allowed(check: Callable[[], Verdict], timeout: float, what: str,
                       sleep: Callable[[float], None] = time.sleep,
                       clock: Callable[[], float] = time.monotonic) -> None:
    """Poll `check` until it allows, sleeping as its verdicts suggest; raise RateLimiterTimeout
    after `timeout` seconds with the last reason, so a starved side fails loudly."""
    deadline = clock() + timeout
    while True:
        verdict = check()
        if verdict.ok:
            return
        remaining = deadline - clock()
        if remaining <= 0:
            raise RateLimiterTimeout(f"{what} blocked for {timeout:g}s: {verdict.reason}")
        sleep(min(max(verdict.retry_after, 0.001), remaining))
