"""Replay: ring storage, uniform and prioritized sampling, the samples-per-insert rate limiter,
snapshots. Pure NumPy; the Ray shard actor wraps ReplayTable."""

from sacfleet.replay_server.rate_limiter import (RateLimited, RateLimiter, RateLimiterTimeout, Verdict,
                                                 wait_until_allowed)
from sacfleet.replay_server.storage import ReplayMemoryError, RingStorage, estimate_bytes
from sacfleet.replay_server.table import ReplayTable, SampleBatch

__all__ = ["RateLimited", "RateLimiter", "RateLimiterTimeout", "ReplayMemoryError", "ReplayTable", "RingStorage",
           "SampleBatch", "Verdict", "estimate_bytes", "wait_until_allowed"]
