"""The learner as a fleet service (hosted in a Ray actor by `sacfleet.driver.fleet`): an update thread fed
by the prefetcher, versioned weights encoded once per version, and calls the driver
and actors make while it trains (status, newest weights, state for checkpoints, stop)."""

from __future__ import annotations

import threading
import time
import traceback
from typing import Mapping

import numpy as np
import torch

from sacfleet.common.config import Config
from sacfleet.common.process import ProcessIdentity, peer_handles, restarted_by_ray
from sacfleet.learner.builder import make_learner
from sacfleet.learner.prefetch import Prefetcher
from sacfleet.learner.publish import PolicyPublisher
from sacfleet.learner.sac import LearnerDiverged, matmul_precision, resolve_device, set_matmul_precision
from sacfleet.replay_server.client import SampleClient


PREFETCH_BLOCKS = 2


def _to_cpu(state):
    if isinstance(state, torch.Tensor):
        return state.detach().cpu().clone()
    if isinstance(state, dict):
        return {k: _to_cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_to_cpu(v) for v in state)
    return state


def learner_seed(seed: int, session: int) -> int:
    """Torch seed of the learner process: train.seed itself in a run's first session, so the fleet
    starts from the networks `--inline` starts from; a fresh stream for each resumed session."""
    if session == 0:
        return seed
    return int(np.random.SeedSequence([seed, session]).generate_state(1, dtype=np.uint64)[0] >> 1)


class LearnerService(ProcessIdentity):
    def __init__(self, cfg: Config, env_info, peers: Mapping, num_threads: int = 1, session: int = 0):
        """`peers`: {"shards": [names of the replay shard actors]}."""
        torch.set_num_threads(max(1, num_threads))
        # Network initialisation and the policy's sampling noise come from train.seed.
        torch.manual_seed(learner_seed(cfg.train.seed, session))
        self.cfg = cfg
        self.device = resolve_device(cfg.learner.device)
        set_matmul_precision(cfg.learner.matmul_precision)
        self.learner = make_learner(cfg.learner, env_info, self.device)
        self.prioritized = cfg.replay.sampler == "prioritized"
        self.sampler = SampleClient(peer_handles(peers)["shards"], cfg.learner.prefetch_batches, cfg.learner.batch_size,
                                    cfg.replay.rate_limit_timeout_s)
        # Two blocks ready: one answer's worth of updates always waits while the next is sampled.
        self.prefetcher = Prefetcher(self.sampler.next, self.device, PREFETCH_BLOCKS, keep_keys=self.prioritized)
        self.lock = threading.Lock()  # held for each update, so state and metrics are read between updates
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="sacfleet-update", daemon=True)
        self.error: str | None = None
        self.diverged: dict | None = None  # {"update", "what", "message"} once the learner diverged
        self.publisher = PolicyPublisher(self.learner, cfg.learner.publish_interval)
        self.seconds_update = 0.0
        self.seconds_waiting = 0.0  # update thread idle: no batch ready
        # A process Ray restarted after a crash waits for the driver to restore the newest checkpoint.
        self.awaiting_restore = restarted_by_ray()

    # ----------------------------------------------------------------------------- update thread

    def restore(self, state: Mapping | None) -> int:
        """Load a checkpoint's state (None: keep the initial networks) before start(): a resumed run's,
        or the newest one in a process Ray restarted. Its policy is published at once, and actors
        take it even when its version is older than theirs."""
        if state is not None:
            self.learner.load_state_dict(state)
        self.awaiting_restore = False
        self.publisher.snapshot()
        return self.learner.updates

    def start(self) -> str:
        if self.awaiting_restore:
            raise RuntimeError("the learner was restarted: restore() its state before start()")
        self.prefetcher.start()
        self.thread.start()
        return str(self.device)

    def _run(self) -> None:
        learner = self.learner
        try:
            while not self.stopping.is_set():
                t0 = time.monotonic()
                item = self.prefetcher.get(timeout=0.1)
                t1 = time.monotonic()
                self.seconds_waiting += t1 - t0
                if item is None:
                    continue
                with self.lock:
                    before = learner.updates
                    td_error = learner.update_block(item.block)
                    self.publisher.after_block(before)
                    if self.publisher.diverged():
                        learner.check_finite()  # raises, naming the first bad update
                        raise LearnerDiverged(learner.updates, "actor parameters")
                if self.prioritized:
                    self.sampler.update_priorities(item.shard, item.keys, learner.priorities(td_error))
                self.seconds_update += time.monotonic() - t1
        except LearnerDiverged as exc:
            # Found before the weights were published: actors keep acting with the last good ones.
            self.diverged = {"update": exc.update, "what": exc.what, "message": str(exc)}
            self.error = f"LearnerDiverged: {exc}"
        except BaseException as exc:
            self.error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"

    # ---------------------------------------------------------------------- calls from the fleet

    def latest_weights(self, have_version: int):
        """(version, encoded weights) if other than `have_version`, else None. Other, not newer:
        a learner recovered from a checkpoint publishes an older version, and actors take it."""
        # The bytes themselves, not a ray.put: each put object's reference bookkeeping (the actors
        # borrow it) grew the learner by 3 to 7 MB a minute at one publish per 10 updates.
        return self.publisher.latest(have_version)

    def status(self, read_metrics: bool = False, metrics_wait_s: float = 5.0) -> dict:
        """Counters and timings, answered on a thread of its own; with `read_metrics` also the metrics
        since the last read, when the update lock comes within `metrics_wait_s` (a first compile or
        CUDA graph capture holds it far longer, and the driver must not take a busy learner for a hung one)."""
        starved_since = self.sampler.starved_since
        status = {"updates": self.learner.updates, "error": self.error, "diverged": self.diverged,
                  "awaiting_restore": self.awaiting_restore,
                  "publishes": self.publisher.snapshots, "weight_encodes": self.publisher.encodes,
                  "weight_pulls": self.publisher.pulls, "weight_bytes": self.publisher.bytes_per_pull,
                  "matmul_precision": matmul_precision(),
                  "device": str(self.device), "seconds_update": self.seconds_update,
                  "seconds_waiting_for_data": self.seconds_waiting,
                  "seconds_sampling": self.prefetcher.seconds_sampling,
                  "starved_reason": self.sampler.last_reason if self.sampler.waiting_since is not None else "",
                  "starved_seconds": time.monotonic() - starved_since if starved_since is not None else 0.0}
        if read_metrics and self.diverged is None and self.lock.acquire(timeout=metrics_wait_s):
            try:
                status["metrics"] = self.learner.metrics.read()
            finally:
                self.lock.release()
        return status

    def state(self) -> dict:
        """Everything a resume needs, on the CPU, taken between two updates. Raises LearnerDiverged
        (and saves nothing) once the learner has diverged."""
        with self.lock:
            return _to_cpu(self.learner.state_dict())

    def stop(self) -> dict:
        """Stop after the current update and publish the final weights."""
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(timeout=30)
        self.prefetcher.stop()
        with self.lock:
            newest = self.publisher.newest
            fresh = newest is None or newest.version != self.learner.updates
            if self.learner.updates > 0 and fresh and self.diverged is None:
                self.publisher.snapshot()
        return self.status()
