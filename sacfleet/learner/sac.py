"""The SAC update: one short function per loss, as in DESIGN.md, and the learner state that owns
networks, targets, optimizers and the temperature.

  q_target    = r + gamma * (1 - terminated) * (min_i Q_target_i(s', a') - alpha * log pi(a'|s'))
                (n-step: r the discounted sum of k rewards, gamma^k for gamma, s' the state k steps on)
  critic_loss = sum_i mean(w * (Q_i(s, a) - q_target)^2)
  actor_loss  = mean(alpha * log pi(a|s) - min_i Q_i(s, a))
  alpha_loss  = -mean(log_alpha * (log pi(a|s) + target_entropy))

With learner.critic=crossq (Bhatt et al., 2024) there are no target critics: the critics, batch-
renormalized, evaluate (s, a) and (s', a') in one forward pass, so that both halves are normalized by
the same batch statistics, and Q(s', a') is held constant in the loss:

  Q(s, a), Q(s', a') = Q([s; s'], [a; a'])
  q_target    = r + gamma * (1 - terminated) * (min_i Q_i(s', a') - alpha * log pi(a'|s'))

With `symlog_q` the critics predict symlog(Q) = sign(Q) log(1 + |Q|) and Q_i = symexp(output):
the critic loss is taken between symlog(Q_i) and symlog(q_target), so its errors are relative
to |Q| and far-away states with huge costs do not drown the small differences near the goal.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import numpy as np
import torch

from sacfleet.learner.batch import Batch
from sacfleet.learner.networks import (CRITICS, ObsNormalizer, PolicyNetwork, TwinCritic, batch_renorm_options,
                                       evaluating)

# What each update reports, averaged over a logging period. q_mean is the mean critic target;
# q1_mean and q2_mean are each critic's mean Q on the batch; the gradient norms are taken before
# the optimizer steps; reward_abs_max is the largest |reward| of the period's batches, for the Q
# bound the health checks compare q_mean with.
METRIC_NAMES = ("train/critic_loss", "train/actor_loss", "train/ent_coef", "train/ent_coef_loss",
                "train/entropy", "train/q_mean", "train/q1_mean", "train/q2_mean", "train/critic_grad_norm",
                "train/actor_grad_norm", "train/reward_abs_max")


class LearnerDiverged(RuntimeError):
    """A loss, gradient norm, Q value or parameter became NaN or infinite; the message names the
    update where it first happened and what was not finite."""

    def __init__(self, update: int, what: str):
        super().__init__(f"learner diverged at update {update}: non-finite {what} (usual causes: a learning rate "
                         f"or learner.reward_scale too large, rewards or observations of huge magnitude; "
                         f"try lower learning rates, learner.obs_clip, learner.obs_norm, learner.obs_symlog or "
                         f"learner.symlog_q)")
        self.update, self.what = update, what

    def __reduce__(self):  # crosses process boundaries (Ray) with its fields
        return type(self), (self.update, self.what)


def symlog(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.log1p(x.abs())


def symexp(x: torch.Tensor) -> torch.Tensor:
    # Clamped so that a diverging critic gives a huge but finite Q (float32 overflows past e^88).
    return torch.sign(x) * torch.expm1(x.abs().clamp(max=80.0))


def q_values(critic: TwinCritic, obs: torch.Tensor, action: torch.Tensor, symlog_q: bool) -> torch.Tensor:
    """Q_i(s, a) for both critics, whatever space they predict in."""
    out = critic(obs, action)
    return symexp(out) if symlog_q else out


def soft_target(batch: Batch, q_next: torch.Tensor, next_log_prob: torch.Tensor, alpha: torch.Tensor,
                gamma: float, reward_scale: float) -> torch.Tensor:
    """r + gamma * (1 - terminated) * (min_i Q_i(s', a') - alpha * log pi(a'|s')), given the minimum; for
    n-step transitions r is the discounted sum of k rewards and the batch's discount gamma^k replaces gamma."""
    discount = gamma if batch.discount is None else batch.discount
    return reward_scale * batch.reward + discount * (1.0 - batch.terminated) * (q_next - alpha * next_log_prob)


def critic_target(actor: PolicyNetwork, target_critic: TwinCritic, batch: Batch, alpha: torch.Tensor,
                  gamma: float, reward_scale: float = 1.0, symlog_q: bool = False) -> torch.Tensor:
    with torch.no_grad():
        next_action, next_log_prob = actor.sample(batch.next_obs)
        q_next = q_values(target_critic, batch.next_obs, next_action, symlog_q).min(0).values
        return soft_target(batch, q_next, next_log_prob, alpha, gamma, reward_scale)


def critic_loss(critic: TwinCritic, batch: Batch, q_target: torch.Tensor,
                symlog_q: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss summed over the twin critics and the per-sample |TD error| (for priorities), both in the
    space the critics predict in; and each critic's mean Q on the batch (for the health checks)."""
    return _regression(critic(batch.obs, batch.action), batch, q_target, symlog_q)


def _regression(predicted: torch.Tensor, batch: Batch, q_target: torch.Tensor,
                symlog_q: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    td = predicted - (symlog(q_target) if symlog_q else q_target)
    squared = td.pow(2) if batch.weights is None else batch.weights * td.pow(2)
    q_each = (symexp(predicted) if symlog_q else predicted).detach().mean(-1)
    return squared.mean(-1).sum(), td.detach().abs().mean(0), q_each


def joint_critic_loss(actor: PolicyNetwork, critic: TwinCritic, batch: Batch, alpha: torch.Tensor, gamma: float,
                      reward_scale: float = 1.0, symlog_q: bool = False) -> tuple[torch.Tensor, ...]:
    """CrossQ's critic loss: (s, a) and (s', a') in one forward pass of the critics (so that batch
    renormalization sees both), the target built from the second half held constant. Returns what
    critic_loss does, and the target."""
    with torch.no_grad():
        next_action, next_log_prob = actor.sample(batch.next_obs)
    both = critic(torch.cat([batch.obs, batch.next_obs], 0), torch.cat([batch.action, next_action], 0))
    predicted, predicted_next = both.split(batch.obs.shape[0], dim=-1)
    with torch.no_grad():
        q_next = (symexp(predicted_next) if symlog_q else predicted_next).min(0).values
        q_target = soft_target(batch, q_next, next_log_prob, alpha, gamma, reward_scale)
    return (*_regression(predicted, batch, q_target, symlog_q), q_target)


def actor_loss(actor: PolicyNetwork, critic: TwinCritic, obs: torch.Tensor,
               alpha: torch.Tensor, symlog_q: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    action, log_prob = actor.sample(obs)
    q = q_values(critic, obs, action, symlog_q).min(0).values
    return (alpha * log_prob - q).mean(), log_prob


def alpha_loss(log_alpha: torch.Tensor, log_prob: torch.Tensor, target_entropy: float) -> torch.Tensor:
    return -(log_alpha * (log_prob.detach() + target_entropy)).mean()


def polyak_update(params: Iterable[torch.Tensor], target_params: Iterable[torch.Tensor], tau: float) -> None:
    """target <- target + tau * (source - target), in place, one fused call for all tensors."""
    with torch.no_grad():
        torch._foreach_lerp_(list(target_params), list(params), tau)


def _adam(params, lr: float, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Adam:
    # The fused kernel updates every tensor in one pass (CPU and CUDA in current torch).
    try:
        return torch.optim.Adam(params, lr=lr, betas=betas, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=lr, betas=betas, foreach=True)


@dataclass(frozen=True)
class Losses:
    """The loss functions an update calls: the plain ones above, or (learner.compiled.accelerate) their
    compiled versions."""
    critic_target: Callable
    critic_loss: Callable
    actor_loss: Callable
    joint_critic_loss: Callable


class MetricAccumulator:
    """Sums update metrics on the device; `read()` makes the single host sync per logging period and
    gives each metric's mean over the updates that measured it (the policy's only over those that
    trained it), or its largest value for the names in `maxima`."""

    def __init__(self, names: tuple[str, ...], device: torch.device, maxima: tuple[str, ...] = ()):
        self.names = names
        self.is_max = torch.tensor([name in maxima for name in names], device=device)
        self.sums = torch.zeros(len(names), device=device)
        self.counts = torch.zeros(len(names), device=device)
        self.maxes = torch.full((len(names),), -math.inf, device=device)
        self.count = 0

    def add(self, values: torch.Tensor, measured: torch.Tensor | None = None) -> None:
        """One update's metrics, or a block's: [k, len(names)] for k updates; `measured` (the same shape,
        bool) says which of them each update measured (default: all)."""
        values = values.reshape(-1, len(self.names))
        if measured is None:
            measured = torch.ones_like(values, dtype=torch.bool)
        measured = measured.reshape(values.shape)
        self.sums += torch.where(measured, values, 0.0).sum(0)
        self.counts += measured.sum(0)
        torch.maximum(self.maxes, torch.where(measured, values, -math.inf).amax(0), out=self.maxes)
        self.count += values.shape[0]

    def read(self) -> dict[str, float]:
        if self.count == 0:
            return {}
        means = torch.where(self.is_max, self.maxes, self.sums / self.counts.clamp(min=1))
        values, counts = torch.stack([means, self.counts]).tolist()  # one host sync
        self.sums.zero_()
        self.counts.zero_()
        self.maxes.fill_(-math.inf)
        self.count = 0
        return {name: value for name, value, count in zip(self.names, values, counts) if count > 0}


class DivergenceWatch:
    """Remembers, on the device, the first update whose metrics (losses, gradient norms, Q values)
    were not all finite, and those metrics. Its tensors change in place, so a CUDA graph of the
    update can hold it; `check()` is its one host sync, made where the learner syncs anyway."""

    def __init__(self, names: tuple[str, ...], device: torch.device):
        self.names = names
        self.update = torch.zeros((), dtype=torch.int64, device=device)  # updates made, counted on the device
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.bad_values = torch.zeros(len(names), device=device)

    def observe(self, values: torch.Tensor) -> None:
        """The metrics of one update, or of a block of k updates ([k, len(names)]): one check per block."""
        values = values.reshape(-1, len(self.names))
        bad = ~torch.isfinite(values).all(-1)
        first = bad.to(torch.int64).argmax()  # the block's first bad update (0 when none is)
        newly = torch.logical_and(bad.any(), self.first_bad < 0)
        self.first_bad.copy_(torch.where(newly, self.update + first + 1, self.first_bad))
        first_values = values.index_select(0, first.view(1))[0]  # not values[first]: that may sync
        self.bad_values.copy_(torch.where(newly, first_values, self.bad_values))
        self.update.add_(values.shape[0])

    def restart_at(self, updates: int) -> None:
        self.update.fill_(updates)
        self.first_bad.fill_(-1)

    def check(self) -> None:
        first = int(self.first_bad)
        if first >= 0:
            bad = [name for name, value in zip(self.names, self.bad_values.tolist()) if not math.isfinite(value)]
            raise LearnerDiverged(first, ", ".join(bad))


def nonfinite_tensors(state: Mapping, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in a (nested) state dict that hold NaN or infinity."""
    bad = []
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            bad += nonfinite_tensors(value, f"{name}.")
        elif isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad.append(name)
    return bad


# What each update measures: all metrics when it trains the policy; otherwise (the critic warm-up, the
# updates between policy updates with learner.policy_delay) not the policy's and the temperature's losses
# and gradients.
POLICY_METRICS = ("train/actor_loss", "train/ent_coef_loss", "train/actor_grad_norm")


class SACLearner:
    """Owns the SAC state and performs updates; has no knowledge of replay, actors or Ray. Speed-ups
    wrap it from outside (learner.compiled.accelerate): they replace `losses` and `block_step`.

    `critic`: mlp (SAC's critics and their Polyak-averaged targets), layernorm (the same with LayerNorm
    in the critics), or crossq (batch renormalization in actor and critics, no target critics, the
    joint forward pass). The policy and temperature learn every `policy_delay` updates."""

    def __init__(self, obs_dim: int, act_dim: int, action_low: np.ndarray, action_high: np.ndarray, *,
                 hidden_sizes=(256, 256), actor_lr: float = 3e-4, critic_lr: float = 3e-4,
                 alpha_lr: float = 3e-4, gamma: float = 0.99, tau: float = 0.005, init_alpha: float = 1.0,
                 learn_alpha: bool = True, target_entropy: float | None = None, reward_scale: float = 1.0,
                 obs_clip: float | None = None, symlog_q: bool = False, obs_norm: bool = False,
                 obs_symlog: bool = False, critic_warmup: int = 0, critic: str = "mlp",
                 critic_hidden_sizes=None, policy_delay: int = 1, adam_beta1: float = 0.9,
                 renorm: Mapping | None = None, device: str | torch.device = "cpu"):
        if critic not in CRITICS:
            raise ValueError(f"learner.critic: {critic!r} is not allowed; choose one of: {', '.join(CRITICS)}")
        self.device = torch.device(device)
        self.gamma, self.tau, self.reward_scale, self.learn_alpha = gamma, tau, reward_scale, learn_alpha
        self.symlog_q = symlog_q
        self.critic_warmup = critic_warmup
        self.critic_kind, self.policy_delay = critic, int(policy_delay)
        self.target_entropy = -float(act_dim) if target_entropy is None else float(target_entropy)
        # One set of observation statistics for all networks, so that they all see the same inputs.
        self.obs_norm = ObsNormalizer(obs_dim).to(self.device) if obs_norm else None
        renorm = dict(renorm or {}) if critic == "crossq" else None
        self.actor = PolicyNetwork(obs_dim, act_dim, hidden_sizes, action_low, action_high, obs_clip,
                                   self.obs_norm, obs_symlog, renorm).to(self.device)
        norm = {"mlp": "none", "layernorm": "layernorm", "crossq": "renorm"}[critic]
        self.critic = TwinCritic(obs_dim, act_dim, tuple(critic_hidden_sizes or hidden_sizes), obs_clip=obs_clip,
                                 obs_norm=self.obs_norm, obs_symlog=obs_symlog, norm=norm,
                                 renorm=renorm).to(self.device)
        # CrossQ has no target critics: its targets come from the critics themselves, in the joint pass.
        self.target_critic: TwinCritic | None = None
        if critic != "crossq":
            shared = {id(self.obs_norm): self.obs_norm} if self.obs_norm is not None else {}
            self.target_critic = copy.deepcopy(self.critic, shared).requires_grad_(False)
        self.log_alpha = torch.tensor(math.log(init_alpha), device=self.device, requires_grad=True)
        betas = (adam_beta1, 0.999)
        self.actor_optim = _adam(self.actor.parameters(), actor_lr, betas)
        self.critic_optim = _adam(self.critic.parameters(), critic_lr, betas)
        self.alpha_optim = _adam([self.log_alpha], alpha_lr, betas)
        self.updates = 0
        self.metrics = MetricAccumulator(METRIC_NAMES, self.device, maxima=("train/reward_abs_max",))
        policy_metric = torch.tensor([name in POLICY_METRICS for name in METRIC_NAMES], device=self.device)
        self.measured = {True: torch.ones_like(policy_metric), False: ~policy_metric}  # by whether the policy learned
        self.divergence = DivergenceWatch(METRIC_NAMES, self.device)
        self.losses = Losses(critic_target, critic_loss, actor_loss, joint_critic_loss)
        self.block_step: Callable[[Batch, int], tuple[torch.Tensor, ...]] = self._block_step
        self.compiled = False  # set by learner.compiled.accelerate

    @property
    def optimizers(self) -> tuple[torch.optim.Optimizer, ...]:
        return self.actor_optim, self.critic_optim, self.alpha_optim

    @property
    def networks(self) -> dict[str, torch.nn.Module]:
        """The networks a checkpoint holds, by their state's key (no target critics with crossq)."""
        networks = {"actor": self.actor, "critic": self.critic}
        if self.target_critic is not None:
            networks["target_critic"] = self.target_critic
        return networks

    @classmethod
    def from_config(cls, cfg, env_info, device: str | torch.device) -> "SACLearner":
        return cls(env_info.obs_dim, env_info.act_dim, env_info.action_low, env_info.action_high,
                   hidden_sizes=tuple(cfg.hidden_sizes), actor_lr=cfg.actor_lr, critic_lr=cfg.critic_lr,
                   alpha_lr=cfg.alpha_lr, gamma=cfg.gamma, tau=cfg.tau, init_alpha=cfg.init_alpha,
                   learn_alpha=cfg.learn_alpha, target_entropy=cfg.target_entropy,
                   reward_scale=cfg.reward_scale, obs_clip=cfg.obs_clip, symlog_q=cfg.symlog_q, obs_norm=cfg.obs_norm,
                   obs_symlog=cfg.obs_symlog, critic_warmup=cfg.critic_warmup, critic=cfg.critic,
                   critic_hidden_sizes=cfg.critic_hidden_sizes, policy_delay=cfg.policy_delay,
                   adam_beta1=cfg.adam_beta1, renorm=batch_renorm_options(cfg), device=device)

    @property
    def alpha(self) -> torch.Tensor:
        return self.log_alpha.detach().exp()

    def update(self, batch: Batch) -> torch.Tensor:
        """One SAC update; returns the per-sample |TD error| (on the device, for priorities)."""
        return self.update_block(batch.as_block())[0]

    @property
    def policy_ready(self) -> bool:
        """Whether the policy has started learning (`critic_warmup` updates made): before, there is no
        policy worth acting with or publishing, and actors keep acting at random."""
        return self.updates >= self.critic_warmup

    def update_block(self, block: Batch) -> torch.Tensor:
        """k SAC updates, one per batch of a block (fields [k, B, ...]), in order: exactly what k calls
        of `update` compute. On CUDA the k updates replay as one graph, so the host's work (a copy,
        a launch, the metrics) is paid once per block. Returns |TD errors| [k, B] on the device.
        A block that starts within the critic warm-up trains the critics only (not in the graph)."""
        if self.policy_ready:
            td_error, values, measured = self.block_step(block, self.updates % self.policy_delay)
        else:
            td_error, values, measured = self._block_step(block, train_policy=False)
        self.updates += block.num_batches
        self.metrics.add(values, measured)
        return td_error

    def _block_step(self, block: Batch, phase: int = 0, train_policy: bool = True) -> tuple[torch.Tensor, ...]:
        """The block's updates with no host syncs, so that they can be captured in one CUDA graph (one
        per `phase`: the first update's place in the policy_delay cycle). Returns the |TD errors|, each
        update's metrics and which of them it measured."""
        steps = [self._step(block[i], train_policy and (phase + i) % self.policy_delay == 0)
                 for i in range(block.num_batches)]
        td_error, values = torch.stack([td for td, _, _ in steps]), torch.stack([values for _, values, _ in steps])
        measured = torch.stack([measured for _, _, measured in steps])
        self.divergence.observe(values)
        return td_error, values, measured

    def _step(self, batch: Batch, train_policy: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The update's tensor work, with no host syncs, so that it can be captured in a CUDA graph.
        Without `train_policy` (the critic warm-up, or between delayed policy updates) the critics learn
        and the policy and temperature stay as they are: in the warm-up an untrained critic's action
        gradients are noise, and a policy that follows them can drive into far-away states it then has to
        learn its way back from."""
        if self.obs_norm is not None:
            self.obs_norm.update(batch.obs)
        alpha = self.alpha
        # The policy acts in eval mode wherever it only supplies actions (batch renormalization by its
        # running statistics, left as they are), as CrossQ's does.
        with evaluating(self.actor):
            if self.target_critic is None:
                loss_q, td_error, q_each, q_target = self.losses.joint_critic_loss(
                    self.actor, self.critic, batch, alpha, self.gamma, self.reward_scale, self.symlog_q)
            else:
                q_target = self.losses.critic_target(self.actor, self.target_critic, batch, alpha, self.gamma,
                                                      self.reward_scale, self.symlog_q)
                loss_q, td_error, q_each = self.losses.critic_loss(self.critic, batch, q_target, self.symlog_q)
        self.critic_optim.zero_grad(set_to_none=True)
        loss_q.backward()
        critic_grad_norm = _grad_norm(self.critic)
        self.critic_optim.step()

        if train_policy:
            loss_pi, log_prob, actor_grad_norm, loss_alpha = self._policy_step(batch.obs, alpha)
        else:
            with torch.no_grad(), evaluating(self.actor):
                _, log_prob = self.actor.sample(batch.obs)  # for the entropy the health checks read
            loss_pi = actor_grad_norm = loss_alpha = torch.zeros((), device=self.device)

        if self.target_critic is not None:
            polyak_update(self.critic.parameters(), self.target_critic.parameters(), self.tau)
        values = torch.stack([loss_q.detach(), loss_pi.detach(), alpha, loss_alpha.detach(),
                              -log_prob.detach().mean(), q_target.mean(), q_each[0], q_each[1],
                              critic_grad_norm, actor_grad_norm, batch.reward.abs().max()])
        return td_error, values, self.measured[train_policy]

    def _policy_step(self, obs: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The actor's and the temperature's steps: (actor loss, log pi, actor gradient norm, alpha loss)."""
        # The critic is only evaluated for the actor loss: frozen, which skips its weight gradients, and
        # in eval mode (batch renormalization by its running statistics), as CrossQ's is.
        self.critic.requires_grad_(False)
        with evaluating(self.critic):
            loss_pi, log_prob = self.losses.actor_loss(self.actor, self.critic, obs, alpha, self.symlog_q)
        self.actor_optim.zero_grad(set_to_none=True)
        loss_pi.backward()
        actor_grad_norm = _grad_norm(self.actor)
        self.actor_optim.step()
        self.critic.requires_grad_(True)

        loss_alpha = alpha_loss(self.log_alpha, log_prob, self.target_entropy)
        if self.learn_alpha:
            self.alpha_optim.zero_grad(set_to_none=True)
            loss_alpha.backward()
            self.alpha_optim.step()
        return loss_pi, log_prob, actor_grad_norm, loss_alpha

    def check_finite(self) -> None:
        """Raise LearnerDiverged if any update so far had a non-finite loss, gradient or Q value.
        One host sync: call it where the learner syncs anyway (publishing, checkpoints, logging)."""
        self.divergence.check()

    def priorities(self, td_error: torch.Tensor) -> np.ndarray:
        """An update's |TD errors| as numpy, for prioritized replay (which syncs here anyway); raises
        LearnerDiverged rather than hand a replay shard priorities from a diverged learner."""
        self.check_finite()
        priorities = td_error.cpu().numpy()
        if not np.isfinite(priorities).all():
            raise LearnerDiverged(self.updates, "TD errors")
        return priorities

    def policy_weights(self) -> dict[str, np.ndarray]:
        """The actor's weights as numpy arrays: what actors need to act. Never non-finite ones:
        raises LearnerDiverged instead, so that a diverged learner publishes nothing."""
        self.check_finite()
        # Copies: on the CPU .numpy() would share memory with parameters that the next update changes.
        weights = {name: tensor.detach().to("cpu", copy=True).numpy()
                   for name, tensor in self.actor.state_dict().items()}
        bad = [name for name, array in weights.items() if not np.isfinite(array).all()]
        if bad:
            raise LearnerDiverged(self.updates, f"actor parameters ({', '.join(bad)})")
        return weights

    def state_dict(self) -> dict:
        """Everything a resume needs; raises LearnerDiverged rather than return non-finite state,
        so that a diverged learner never overwrites the last good checkpoint."""
        self.check_finite()
        state = {**{name: module.state_dict() for name, module in self.networks.items()},
                 "log_alpha": self.log_alpha.detach().clone(), "actor_optim": self.actor_optim.state_dict(),
                 "critic_optim": self.critic_optim.state_dict(), "alpha_optim": self.alpha_optim.state_dict(),
                 "updates": self.updates}
        bad = nonfinite_tensors(state)
        if bad:
            raise LearnerDiverged(self.updates, f"parameters or optimizer state ({', '.join(bad[:5])})")
        return state

    def load_state_dict(self, state: Mapping) -> None:
        # Some buffers hold settings (obs_clip, obs_symlog, action scale and bias), not learned values:
        # this learner's configured ones win, so that `--resume DIR --set learner.obs_clip=5` takes
        # effect. The others (observation statistics, batch renormalization's) are learned, and restored.
        for name, module in self.networks.items():
            settings = {key: value for key, value in module.named_buffers()
                        if key.rsplit(".", 1)[-1] in PolicyNetwork.SETTINGS}
            module.load_state_dict({**state[name], **settings})
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        for optim, name in zip(self.optimizers, ("actor_optim", "critic_optim", "alpha_optim")):
            _load_keeping_settings(optim, state[name])
        self.updates = int(state["updates"])
        self.divergence.restart_at(self.updates)


def _load_keeping_settings(optim: torch.optim.Optimizer, state: Mapping) -> None:
    """Load an optimizer's state (moments, step counts) with its own settings: a checkpoint's param
    groups carry those of the learner that saved it (learning rates, fused, capturable), and the
    configured ones win, so that `--resume DIR --set learner.actor_lr=...` takes effect. torch places
    the step counts as the settings loaded say."""
    own = [{key: value for key, value in group.items() if key != "params"} for group in optim.param_groups]
    groups = [{**saved, **mine} for saved, mine in zip(state["param_groups"], own)]
    optim.load_state_dict({**state, "param_groups": groups})


def _grad_norm(module: torch.nn.Module) -> torch.Tensor:
    """L2 norm of all of a module's gradients, on the device (no sync): one fused norm per tensor,
    as clip_grad_norm_ computes it, without its per-call bookkeeping (2.5x faster for small nets)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def set_matmul_precision(precision: str) -> None:
    """learner.matmul_precision for this process's CUDA matmuls (torch keeps it per process): float32
    is IEEE single precision, tf32 rounds the multiplicands to TF32's 10-bit mantissa on Ampere and
    later GPUs. The one torch API is used (torch >= 2.9 refuses reads after a mix of old and new)."""
    if precision not in ("float32", "tf32"):
        raise ValueError(f"learner.matmul_precision: {precision!r} is not allowed; choose one of: float32, tf32")
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        matmul.fp32_precision = "tf32" if precision == "tf32" else "ieee"
    else:  # torch before 2.9
        matmul.allow_tf32 = precision == "tf32"


def matmul_precision() -> str:
    """The CUDA matmul precision this process has: float32 or tf32."""
    matmul = torch.backends.cuda.matmul
    tf32 = matmul.fp32_precision == "tf32" if hasattr(matmul, "fp32_precision") else matmul.allow_tf32
    return "tf32" if tf32 else "float32"


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("learner.device=cuda, but torch sees no CUDA device; use learner.device=auto or cpu")
    return torch.device(requested)
