"""`sacfleet eval`: a checkpoint's policy run for deterministic episodes, as a run's final evaluation is."""

from __future__ import annotations

from pathlib import Path

import torch

from sacfleet.actors.evaluate import evaluate
from sacfleet.common.config import from_dict
from sacfleet.driver.checkpoint_files import BEST_FILE, CheckpointError, load_checkpoint, newest_checkpoint
from sacfleet.driver.report import success_note
from sacfleet.learner.networks import PolicyNetwork


def evaluate_checkpoint(path: Path, episodes: int, seed: int | None = None, best: bool = False) -> str:
    """Evaluate the policy of the checkpoint at `path` (a checkpoint file, or a run's or checkpoints
    directory; with `best`, the best-evaluated policy such a directory keeps) for `episodes` episodes
    seeded by `seed` (default: the run's eval.seed); returns the line that says how it did. Raises
    CheckpointError for what is not a readable checkpoint."""
    found = None if best or Path(path).is_file() else newest_checkpoint(path)
    state = found.state if found else load_checkpoint(best_policy_path(path) if best else path)
    cfg, info = from_dict(state["config"]), state["env_info"]
    policy = PolicyNetwork.for_config(cfg.learner, info["obs_dim"], info["act_dim"], info["action_low"],
                                      info["action_high"])
    policy.load_state_dict(state["learner"]["actor"])
    torch.set_num_threads(1)
    returns, success_rate = evaluate(policy, cfg.env, episodes, cfg.eval.seed if seed is None else seed)
    kept = state.get("best")
    source = (f"best policy, evaluated {kept['return_mean']:.2f} at {state['env_steps']:,} env steps, "
              f"{state['learner']['updates']:,} updates" if kept else
              f"checkpoint at {state['env_steps']:,} env steps, {state['learner']['updates']:,} updates")
    skipped = f"; {found.note()}" if found and found.skipped else ""
    return (f"{cfg.env.id}: eval return {returns.mean():.2f} +- {returns.std():.2f} over {returns.size} episodes"
            f"{success_note(success_rate)} ({source}{skipped})")


def best_policy_path(path: Path) -> Path:
    """checkpoints/best.pt of a run directory, or of a checkpoints directory."""
    path = Path(path)
    if path.is_file():
        raise CheckpointError(f"--best takes a run or checkpoints directory, not the file {path}")
    for candidate in (path / BEST_FILE, path / "checkpoints" / BEST_FILE):
        if candidate.is_file():
            return candidate
    raise CheckpointError(f"no best policy in {path}: checkpoints/{BEST_FILE} is written at evaluations of runs "
                          f"with checkpoint.best=true")
