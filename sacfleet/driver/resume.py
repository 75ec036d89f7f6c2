"""What a resumed run continues from: its directory's newest checkpoint set that reads back whole,
checked against the resumed config and environment before anything in the directory changes. A
changed key is either applied or refused with the reason; none is ignored."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sacfleet.common.config import Config, to_dict
from sacfleet.common.envs import EnvInfo
from sacfleet.driver.checkpoint_files import (CheckpointError, check_replay_files, kept_files, newest_checkpoint,
                                              read_checkpoint_file, replay_manifest)

# Keys a resumed run cannot change, and why.
FIXED_KEYS = {
    "env.id": "the checkpoint's networks were trained on another environment",
    "learner.hidden_sizes": "the checkpoint's networks have other layer sizes",
    "learner.symlog_q": "the checkpoint's critics predict Q in another space",
    "learner.obs_norm": "the checkpoint's networks were trained on observations standardized otherwise",
    "learner.obs_symlog": "the checkpoint's networks were trained on observations transformed otherwise",
    "learner.critic": "the checkpoint's networks have another architecture (and crossq keeps no target critics)",
    "learner.critic_hidden_sizes": "the checkpoint's critics have other layer sizes",
}
# Keys the restored replay snapshots fix.
FIXED_WITH_REPLAY = {
    "replay.capacity": "the replay snapshots hold shards of another capacity",
    "replay.num_shards": "the replay snapshots hold another number of shards",
    "replay.sampler": "the replay snapshots were taken with another sampler",
}


@dataclass
class ResumePoint:
    """A checkpoint a run continues from, and the counters of its earlier sessions."""

    learner_state: dict
    env_steps: int
    session: int  # this session's number: 1 for the first resume
    wall_seconds: float = 0.0
    evals: list = field(default_factory=list)
    restarts: int = 0
    recoveries: list = field(default_factory=list)  # shard and learner recoveries of earlier sessions
    lags: list = field(default_factory=list)
    replay: dict | None = None  # the checkpoint set's replay manifest, its files checked
    applied: list[str] = field(default_factory=list)  # 'key old -> new' for each key the resume changes
    path: Path | None = None  # the set's file
    skipped: str = ""  # which newer sets did not read back, and why ("" when the newest did)
    damaged: list[Path] = field(default_factory=list)  # their files
    kept_replay: list = field(default_factory=list)  # replay manifests of this set and the older kept ones


def _flat(config: dict) -> dict[str, object]:
    return {f"{section}.{key}": value for section, body in config.items() for key, value in (body or {}).items()}


def load_resume(run_dir: Path, cfg: Config, env_info: EnvInfo) -> ResumePoint:
    """Read and check the checkpoint in `run_dir` for a session with `cfg` on `env_info`; raises
    CheckpointError naming what does not fit. Reads only: the caller writes config.yaml after."""
    checkpoint_dir = Path(run_dir) / "checkpoints"
    found = newest_checkpoint(checkpoint_dir, check_replay_files if cfg.checkpoint.replay else None)
    state = found.state
    before, now = _flat(state.get("config", {})), _flat(to_dict(cfg))
    changed = {key: (before[key], now[key]) for key in now if key in before and before[key] != now[key]}
    for key, why in FIXED_KEYS.items():
        if key in changed:
            raise CheckpointError(f"--resume cannot change {key} ({changed[key][0]!r} -> {changed[key][1]!r}): {why}; "
                                  f"start a new run instead")
    _check_env(state.get("env_info", {}), env_info, cfg.env.id)
    env_steps = int(state["env_steps"])
    if env_steps >= cfg.train.total_env_steps:
        raise CheckpointError(f"the run in {run_dir} already has {env_steps:,} env steps, "
                              f"train.total_env_steps={cfg.train.total_env_steps:,}; raise it to continue, "
                              f"e.g. --set train.total_env_steps={2 * cfg.train.total_env_steps}")
    replay = replay_manifest(state, checkpoint_dir, cfg.replay.num_shards) if cfg.checkpoint.replay else None
    if replay:
        for key, why in FIXED_WITH_REPLAY.items():
            if key in changed:
                raise CheckpointError(f"--resume cannot change {key} ({changed[key][0]!r} -> {changed[key][1]!r}) "
                                      f"while restoring the replay: {why}; resume with checkpoint.replay=false "
                                      f"to start from an empty buffer")

    learner_state = state["learner"]
    applied = [f"{key} {old!r} -> {new!r}" for key, (old, new) in changed.items()]
    if "learner.init_alpha" in changed:
        # The temperature was learned from init_alpha; setting it again on a resume means restarting it there.
        learner_state = {**learner_state, "log_alpha": torch.tensor(math.log(cfg.learner.init_alpha))}
    # learner.obs_clip needs nothing here: a learner loading a checkpoint keeps its own configured buffers.
    prior = state.get("fleet", {})
    return ResumePoint(learner_state=learner_state, env_steps=env_steps, session=int(prior.get("session", 0)) + 1,
                       wall_seconds=float(prior.get("wall_seconds", 0.0)), evals=list(prior.get("evals", [])),
                       restarts=int(prior.get("restarts", 0)), lags=list(prior.get("lags", [])),
                       recoveries=list(prior.get("recoveries", [])),
                       replay=replay, applied=applied, path=found.path, skipped=found.note(),
                       damaged=[path for path, _ in found.skipped],
                       kept_replay=[replay, *_older_replay(checkpoint_dir, found.path)] if replay else [])


def _older_replay(directory: Path, chosen: Path) -> list:
    """The replay manifests of the kept sets older than `chosen`, whose files must stay while they are
    kept (an unreadable one lists none)."""
    older = kept_files(directory)
    manifests = []
    for path in older[older.index(chosen) + 1:]:
        try:
            manifests.append(read_checkpoint_file(path).get("replay"))
        except CheckpointError:
            manifests.append(None)
    return manifests


def _check_env(saved: dict, env_info: EnvInfo, env_id: str) -> None:
    for key in ("obs_dim", "act_dim"):
        if saved.get(key) != getattr(env_info, key):
            raise CheckpointError(f"the checkpoint is for another environment than {env_id}: {key} "
                                  f"{saved.get(key)} there, {getattr(env_info, key)} now")
    saved_keys = [tuple(pair) for pair in saved.get("obs_keys", [])]
    if saved_keys != list(env_info.obs_keys):
        raise CheckpointError(f"the checkpoint is for another observation layout than {env_id} has: keys "
                              f"{saved_keys or 'none (flat)'} there, {list(env_info.obs_keys) or 'none (flat)'} now")
    low, high = np.asarray(saved.get("action_low"), np.float32), np.asarray(saved.get("action_high"), np.float32)
    if low.shape != env_info.action_low.shape or not (np.array_equal(low, env_info.action_low)
                                                      and np.array_equal(high, env_info.action_high)):
        raise CheckpointError(
            f"--resume cannot change the action bounds (the checkpoint's policy and critics were trained on actions "
            f"in [{_bounds(low)}, {_bounds(high)}], {env_id} now has [{_bounds(env_info.action_low)}, "
            f"{_bounds(env_info.action_high)}]; check env.kwargs); start a new run instead")


def _bounds(array: np.ndarray) -> str:
    values = np.unique(np.asarray(array, np.float64))
    return f"{values[0]:g}" if values.size == 1 else "[" + ", ".join(f"{v:g}" for v in np.asarray(array).ravel()) + "]"
