"""The learner: SAC networks, losses, update step and checkpoints. Needs only torch and numpy."""

from sacfleet.learner.networks import Actor, TwinCritic, squashed_log_prob
from sacfleet.learner.sac import (Batch, LearnerDiverged, SACLearner, actor_loss, alpha_loss, critic_loss,
                                  critic_target, polyak_update, q_values, resolve_device, symexp, symlog)

__all__ = ["Actor", "Batch", "LearnerDiverged", "SACLearner", "TwinCritic", "actor_loss", "alpha_loss",
           "critic_loss", "critic_target", "polyak_update", "q_values", "resolve_device", "squashed_log_prob",
           "symexp", "symlog"]
