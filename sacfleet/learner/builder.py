"""The learner a config asks for: the SAC state, with the speed-ups learner.compile turns on wrapped
around it from outside."""

from __future__ import annotations

import torch

from sacfleet.learner.compiled import accelerate, resolve_compile
from sacfleet.learner.sac import SACLearner


def make_learner(cfg, env_info, device: str | torch.device) -> SACLearner:
    """`cfg`: the learner section of a config; `env_info`: the env's shapes and action bounds."""
    learner = SACLearner.from_config(cfg, env_info, device)
    return accelerate(learner) if resolve_compile(cfg.compile, learner.device) else learner
