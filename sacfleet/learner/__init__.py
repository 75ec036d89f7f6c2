"""The learner: networks, SAC losses and update step, the speed-ups wrapped around it, weight publishing
and the fleet's learner service. All but the service need only torch and numpy."""

from sacfleet.learner.batch import Batch
from sacfleet.learner.networks import BatchRenorm, PolicyNetwork, TwinCritic, evaluating, squashed_log_prob
from sacfleet.learner.sac import (LearnerDiverged, SACLearner, actor_loss, alpha_loss, critic_loss, critic_target,
                                  joint_critic_loss, polyak_update, q_values, resolve_device, symexp, symlog)

__all__ = ["Batch", "BatchRenorm", "LearnerDiverged", "PolicyNetwork", "SACLearner", "TwinCritic", "actor_loss",
           "alpha_loss", "critic_loss", "critic_target", "evaluating", "joint_critic_loss", "polyak_update", "q_values",
           "resolve_device", "squashed_log_prob", "symexp", "symlog"]
