"""What a sweep is: a preset, its seeds and the grid of config values, the trials (one per grid point and
seed) and where each writes; kept in `sweep.yaml` so that rerunning a sweep directory continues the
same sweep and refuses another."""

from __future__ import annotations

import itertools
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from sacfleet.common.config import ConfigError, load_config

SPEC_FILE = "sweep.yaml"


class SweepRefused(ValueError):
    """Input the sweep cannot run: the message names the option or key and what it accepts."""


def parse_seeds(text: str) -> tuple[int, ...]:
    """"0-9", "0,3,5" or "0-4,7" -> the seeds, in order, each once."""
    seeds: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise SweepRefused(f"--seeds: expected seeds >= 0 as 0-9, 0,3,5 or 0-4,7; got {text!r}")
        first, last = int(match[1]), int(match[2] if match[2] is not None else match[1])
        if last < first:
            raise SweepRefused(f"--seeds: the range {part.strip()!r} runs backwards")
        seeds += [s for s in range(first, last + 1) if s not in seeds]
    return tuple(seeds)


def parse_grid(text: str) -> tuple[str, tuple[str, ...]]:
    """"learner.actor_lr=0.001,0.0003" -> (key, values); values are config values as --set takes them."""
    key, sep, values = text.partition("=")
    key = key.strip()
    if not sep or not re.fullmatch(r"[a-z_]+\.[a-z_0-9]+", key) or not values.strip():
        raise SweepRefused(f"--grid: expected SECTION.KEY=V1,V2,... (e.g. learner.actor_lr=0.001,0.0003), got {text!r}")
    # A list value ([64,64]) keeps its commas: split only outside brackets.
    parts = [p.strip() for p in re.split(r",(?![^\[]*\])", values)]
    if any(not p for p in parts) or len(set(parts)) != len(parts):
        raise SweepRefused(f"--grid {key}: values must be non-empty and distinct, got {values!r}")
    return key, tuple(parts)


@dataclass(frozen=True)
class Trial:
    point: str  # the grid point's label
    overrides: tuple[str, ...]  # the point's KEY=VALUE settings
    seed: int

    @property
    def name(self) -> str:
        return f"{self.point} s{self.seed}"


@dataclass
class SweepSpec:
    config: str
    seeds: tuple[int, ...]
    grid: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    overrides: tuple[str, ...] = ()
    fleet: bool = False
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0

    def points(self) -> list[tuple[str, tuple[str, ...]]]:
        """(label, overrides) of every grid point, in the order the grid was given; one point, "base",
        without a grid."""
        if not self.grid:
            return [("base", ())]
        keys = [key for key, _ in self.grid]
        short = _short_names(keys)
        return [(",".join(f"{short[k]}={v}" for k, v in zip(keys, values)),
                 tuple(f"{k}={v}" for k, v in zip(keys, values)))
                for values in itertools.product(*(values for _, values in self.grid))]

    def trials(self) -> list[Trial]:
        """Seed-major, so that a sweep stopped early holds comparable grid points."""
        return [Trial(label, overrides, seed) for seed in self.seeds for label, overrides in self.points()]

    def trial_overrides(self, trial: Trial) -> list[str]:
        return [*self.overrides, *trial.overrides, f"train.seed={trial.seed}"]

    def check(self) -> dict[str, str]:
        """Load every grid point's config: a bad --set or an unknown key refuses the sweep (ConfigError
        naming the key); a value that one point cannot take leaves that point's trials to fail with the
        reason. Returns {point: reason} of the points refused."""
        load_config(self.config, list(self.overrides))
        refused = {}
        for label, overrides in self.points():
            try:
                load_config(self.config, [*self.overrides, *overrides])
            except ConfigError as exc:
                refused[label] = str(exc)
        if refused and len(refused) == len(self.points()):
            raise ConfigError(next(iter(refused.values())))
        return refused

    def to_dict(self) -> dict:
        out = asdict(self)
        out["seeds"] = list(self.seeds)
        out["grid"] = [[key, list(values)] for key, values in self.grid]
        out["overrides"] = list(self.overrides)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "SweepSpec":
        return cls(data["config"], tuple(data["seeds"]), [(k, tuple(v)) for k, v in data.get("grid", [])],
                   tuple(data.get("overrides", ())), bool(data.get("fleet", False)),
                   float(data.get("cpus_per_trial", 1.0)), float(data.get("gpus_per_trial", 0.0)))


def trial_dir(sweep_dir: Path, trial: Trial) -> Path:
    """The trial's run directory: trials/<point>/s<seed>, with s<seed>.log and s<seed>.json beside it."""
    return Path(sweep_dir) / "trials" / re.sub(r"[^A-Za-z0-9_.,=+-]", "_", trial.point) / f"s{trial.seed}"


def open_sweep_dir(sweep_dir: Path, spec: SweepSpec) -> bool:
    """Create the sweep directory with its sweep.yaml, or check that an existing one holds this sweep
    (the same config, grid, settings and trial resources; seeds may be added). Returns whether it
    existed. Raises SweepRefused when it holds something else."""
    sweep_dir = Path(sweep_dir)
    path = sweep_dir / SPEC_FILE
    if not path.is_file():
        if sweep_dir.exists() and any(sweep_dir.iterdir()):
            raise SweepRefused(f"--run-dir {sweep_dir} exists and holds no {SPEC_FILE}: not a sweep directory; "
                               f"choose another")
        sweep_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
        return False
    saved = SweepSpec.from_dict(yaml.safe_load(path.read_text()))
    differ = [name for name in ("config", "grid", "overrides", "fleet")
              if getattr(saved, name) != getattr(spec, name)]
    if differ:
        what = "; ".join(f"{name}: {getattr(saved, name)!r} there, {getattr(spec, name)!r} now" for name in differ)
        raise SweepRefused(f"--run-dir {sweep_dir} holds another sweep ({what}); rerun it as it was to resume it, "
                           f"or choose another --run-dir")
    if set(spec.seeds) != set(saved.seeds):
        path.write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    return True


def _short_names(keys: list[str]) -> dict[str, str]:
    """The last part of each key (learner.actor_lr -> actor_lr), or the whole key where two share it."""
    last = [k.split(".")[-1] for k in keys]
    return {k: (name if last.count(name) == 1 else k) for k, name in zip(keys, last)}
