"""`sacfleet eval`: a checkpoint's policy run for deterministic episodes, as a run's final evaluation is."""

from __future__ import annotations

from pathlib import Path

import torch

from sacfleet.actors.evaluate import evaluate
from sacfleet.common.config import from_dict
from sacfleet.driver.checkpoint_files import load_checkpoint
from sacfleet.driver.report import success_note
from sacfleet.learner.networks import PolicyNetwork


def evaluate_checkpoint(path: Path, episodes: int, seed: int | None = None) -> str:
    """Evaluate the policy of the checkpoint at `path` (a checkpoint file, or a run's or checkpoints
    directory) for `episodes` episodes seeded by `seed` (default: the run's eval.seed); returns the
    line that says how it did. Raises CheckpointError for what is not a readable checkpoint."""
    state = load_checkpoint(path)
    cfg, info = from_dict(state["config"]), state["env_info"]
    policy = PolicyNetwork(info["obs_dim"], info["act_dim"], cfg.learner.hidden_sizes, info["action_low"],
                           info["action_high"])
    policy.load_state_dict(state["learner"]["actor"])
    torch.set_num_threads(1)
    returns, success_rate = evaluate(policy, cfg.env, episodes, cfg.eval.seed if seed is None else seed)
    return (f"{cfg.env.id}: eval return {returns.mean():.2f} +- {returns.std():.2f} over {returns.size} episodes"
            f"{success_note(success_rate)} (checkpoint at {state['env_steps']:,} env steps, "
            f"{state['learner']['updates']:,} updates)")
