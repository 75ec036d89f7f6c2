"""`sacfleet bench`: throughput suites, each returning `Record`s that are printed as a table,
dumped as JSON and plotted. Suites are imported on demand, so that the learner suite needs only
torch and numpy."""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import asdict, dataclass

SUITES = ("env", "actors", "replay", "learner", "e2e")


@dataclass
class Record:
    """One measured figure. Fields that do not apply to a suite are None (null in JSON)."""
    suite: str
    name: str
    metric: str
    value: float
    unit: str
    device: str | None = None
    batch_size: int | None = None
    actors: int | None = None

    def as_dict(self) -> dict:
        data = asdict(self)
        return {key: data[key] for key in ("suite", "name", "device", "batch_size", "actors", "metric",
                                            "value", "unit")}


def suite_module(name: str):
    if name not in SUITES:
        raise ValueError(f"unknown bench suite {name!r}; choose from: {', '.join(SUITES)}")
    return importlib.import_module(f"sacfleet.bench.{name}_suite")


@contextlib.contextmanager
def ray_session(num_cpus: int):
    """An embedded Ray for a suite, unless one is already running (then it is left running)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        if started:
            ray.shutdown()
