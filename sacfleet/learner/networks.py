"""SAC networks: the squashed Gaussian policy network (SAC's actor) and the twin critic evaluated as one
batched ensemble, each plain, with LayerNorm (critic) or with batch renormalization (CrossQ)."""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0
_LOG_2 = math.log(2.0)
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


CRITICS = ("mlp", "layernorm", "crossq")  # learner.critic
BATCH_RENORM_EPS = 1e-3  # CrossQ's (and flax BatchNorm's) epsilon; the numpy policy folds it in too


def mlp(sizes: Sequence[int], renorm: Mapping | None = None) -> nn.Sequential:
    """Linear layers with ReLU between them (none after the last). With `renorm` (BatchRenorm's keyword
    arguments), as CrossQ's actor: batch renormalization of the input and after each ReLU."""
    layers: list[nn.Module] = [BatchRenorm(sizes[0], **renorm)] if renorm is not None else []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU(inplace=True))  # the Linear before it does not need its output
            if renorm is not None:
                layers.append(BatchRenorm(fan_out, **renorm))
    return nn.Sequential(*layers)


class BatchRenorm(nn.Module):
    """Batch renormalization (Ioffe, 2017), as CrossQ (Bhatt et al., 2024) normalizes its networks.

    In training mode: x_hat = (x - mu_B) / sigma_B * r + d, with r = sigma_B / sigma and d = (mu_B - mu) /
    sigma (running mu, sigma) clipped to [1/r_max, r_max] and [-d_max, d_max] and held constant in the
    backward pass; for the first `warmup` training calls r = 1 and d = 0, plain batch normalization,
    while the running statistics (an exponential average with `momentum`) settle. In eval mode:
    (x - mu) / sigma. Then y = weight * x_hat + bias.

    `members` > 0 normalizes an ensemble's input [members, B, features] with each member's own statistics
    and affine parameters; otherwise the input is [B, features]."""

    RUNNING_MEAN, RUNNING_VAR, STEPS = "running_mean", "running_var", "steps"

    def __init__(self, features: int, members: int = 0, momentum: float = 0.99, warmup: int = 100_000,
                 r_max: float = 3.0, d_max: float = 5.0):
        super().__init__()
        shape = (members, 1, features) if members else (features,)
        self.reduce_dims, self.keepdim = ((1,), True) if members else ((0,), False)
        self.momentum, self.warmup, self.r_max, self.d_max = momentum, warmup, r_max, d_max
        self.weight = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape))
        self.register_buffer(self.RUNNING_MEAN, torch.zeros(shape))
        self.register_buffer(self.RUNNING_VAR, torch.ones(shape))
        self.register_buffer(self.STEPS, torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        running_std = (self.running_var + BATCH_RENORM_EPS).sqrt()
        if not self.training:
            return (x - self.running_mean) / running_std * self.weight + self.bias
        batch_var, batch_mean = torch.var_mean(x, dim=self.reduce_dims, correction=0, keepdim=self.keepdim)
        batch_std = (batch_var + BATCH_RENORM_EPS).sqrt()
        with torch.no_grad():
            # No host sync: the warm-up is a select on the device, so a CUDA graph can hold the layer.
            renorm = self.steps >= self.warmup
            r = torch.where(renorm, (batch_std / running_std).clamp(1.0 / self.r_max, self.r_max), 1.0)
            d = torch.where(renorm, ((batch_mean - self.running_mean) / running_std).clamp(-self.d_max, self.d_max), 0.0)
            self.running_mean.lerp_(batch_mean, 1.0 - self.momentum)
            self.running_var.lerp_(batch_var, 1.0 - self.momentum)
            self.steps.add_(1)
        return ((x - batch_mean) / batch_std * r + d) * self.weight + self.bias

    def eval_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) such that the eval-mode output is x * scale + shift."""
        scale = self.weight / (self.running_var + BATCH_RENORM_EPS).sqrt()
        return scale, self.bias - self.running_mean * scale


class EnsembleLayerNorm(nn.Module):
    """LayerNorm over the features of an ensemble's activations [members, B, features], with each
    member's own gain and bias (as BRO and SimbaV2 normalize their critics)."""

    def __init__(self, members: int, features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(members, 1, features))
        self.bias = nn.Parameter(torch.zeros(members, 1, features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:]) * self.weight + self.bias


@contextlib.contextmanager
def evaluating(*modules: nn.Module) -> Iterator[None]:
    """Run the block with `modules` in eval mode (batch renormalization by its running statistics, which
    it then leaves as they are), and restore their modes after."""
    modes = [module.training for module in modules]
    for module in modules:
        module.train(False)
    try:
        yield
    finally:
        for module, mode in zip(modules, modes):
            module.train(mode)


def squashed_log_prob(u: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor,
                      noise: torch.Tensor | None = None) -> torch.Tensor:
    """log pi(a|s) of the normalized action a = tanh(u) in [-1, 1]^|A|, u ~ N(mean, std), summed over
    action dims.

    Normalized, not in env units: the env action scale * a + bias would add sum(log scale) to every
    log-prob, and the entropy target -|A| (SAC's and SB3's, both stated for [-1, 1] actions) would then
    mean another entropy on every env whose bounds are not +-1 (Humanoid's +-0.4: -|A| - 15.6 nats).
    The tanh Jacobian uses log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)), exact and finite even
    where tanh saturates. For a reparameterised sample u = mean + std * noise, pass `noise`:
    (u - mean) / std is then `noise` itself, with the same gradients and fewer operations."""
    z = (u - mean) / log_std.exp() if noise is None else noise
    gaussian = -0.5 * z.pow(2) - log_std - _HALF_LOG_2PI
    log_det = 2.0 * (_LOG_2 - u - F.softplus(-2.0 * u))
    return (gaussian - log_det).sum(-1)


NO_CLIP = float(torch.finfo(torch.float32).max)  # finite, so weights pass the codec's finiteness check
OBS_NORM_EPS = 1e-8  # added to the variance, as SB3's VecNormalize does


class ObsNormalizer(nn.Module):
    """Running mean and variance of the observations the learner trains on, and the standardization
    the networks see their input through: (obs - mean) / sqrt(var + eps).

    One instance is shared by the policy, the critics and the target critics, so that all of them
    see the same inputs; its buffers travel in the policy's state dict (published weights,
    checkpoints). `update` merges a batch into the statistics (Chan et al.'s parallel form, in
    float64) in place and without host syncs, so that a CUDA graph of the update can hold it."""

    COUNT, MEAN, VAR = "count", "mean", "var"

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer(self.COUNT, torch.zeros((), dtype=torch.float64))
        self.register_buffer(self.MEAN, torch.zeros(dim, dtype=torch.float64))
        self.register_buffer(self.VAR, torch.ones(dim, dtype=torch.float64))

    @torch.no_grad()
    def update(self, obs: torch.Tensor) -> None:
        x = obs.reshape(-1, self.mean.shape[0]).to(torch.float64)
        n = x.shape[0]
        batch_var, batch_mean = torch.var_mean(x, dim=0, correction=0)
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta.pow(2) * (self.count * n / total)
        self.mean.add_(delta * (n / total))
        self.var.copy_(m2 / total)
        self.count.copy_(total)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return (obs - self.mean.to(obs.dtype)) * torch.rsqrt(self.var.to(obs.dtype) + OBS_NORM_EPS)


def network_input(obs: torch.Tensor, obs_norm: ObsNormalizer | None, obs_clip: torch.Tensor,
                  obs_symlog: bool) -> torch.Tensor:
    """What the networks see of an observation: standardized (learner.obs_norm), clipped
    (learner.obs_clip), then symlog (learner.obs_symlog)."""
    if obs_norm is not None:
        obs = obs_norm(obs)
    obs = torch.clamp(obs, -obs_clip, obs_clip)
    return torch.sign(obs) * torch.log1p(obs.abs()) if obs_symlog else obs


class PolicyNetwork(nn.Module):
    """SAC's actor: the squashed Gaussian policy, an MLP trunk giving each action dimension's mean and
    log std. Its state dict is what the learner publishes and env actors act with in numpy
    (actors/policy.py), by the key names below."""

    # State-dict keys: the buffers, the observation statistics (with learner.obs_norm only), and the
    # trunk's layers (an mlp(): an nn.Sequential of Linear layers with ReLUs between them, and with
    # learner.critic=crossq BatchRenorm layers on the input and after each ReLU).
    OBS_CLIP, OBS_SYMLOG, ACTION_SCALE, ACTION_BIAS = "obs_clip", "obs_symlog", "action_scale", "action_bias"
    SETTINGS = (OBS_CLIP, OBS_SYMLOG, ACTION_SCALE, ACTION_BIAS)  # buffers that hold settings, not learned values
    OBS_NORM = "obs_norm"
    TRUNK = "trunk"

    def __init__(self, obs_dim: int, act_dim: int, hidden_sizes: Sequence[int],
                 action_low: np.ndarray, action_high: np.ndarray, obs_clip: float | None = None,
                 obs_norm: ObsNormalizer | bool | None = None, obs_symlog: bool = False,
                 renorm: Mapping | None = None):
        """`obs_norm`: the learner's shared ObsNormalizer, True for one of this network's own (to load
        published weights into), or None. `renorm`: BatchRenorm's keyword arguments, for CrossQ's actor."""
        super().__init__()
        self.act_dim = act_dim
        # Buffers, so that actors loading the learner's weights see observations as the learner does.
        self.register_buffer(self.OBS_CLIP, torch.tensor(NO_CLIP if obs_clip is None else float(obs_clip)))
        self.register_buffer(self.OBS_SYMLOG, torch.tensor(float(obs_symlog)))
        self.symlog_input = bool(obs_symlog)  # the buffer's value, read without a device sync
        self.obs_norm = ObsNormalizer(obs_dim) if obs_norm is True else (obs_norm if isinstance(obs_norm, ObsNormalizer) else None)
        self.trunk = mlp([obs_dim, *hidden_sizes, 2 * act_dim], renorm)
        low = torch.tensor(np.asarray(action_low, dtype=np.float32))  # copies: the bounds may be read-only
        high = torch.tensor(np.asarray(action_high, dtype=np.float32))
        self.register_buffer(self.ACTION_SCALE, (high - low) / 2.0)
        self.register_buffer(self.ACTION_BIAS, (high + low) / 2.0)

    @classmethod
    def for_config(cls, learner_cfg, obs_dim: int, act_dim: int, action_low: np.ndarray, action_high: np.ndarray,
                   obs_norm: ObsNormalizer | bool | None = None) -> "PolicyNetwork":
        """The policy network a config's learner trains (`learner_cfg`: its LearnerConfig); by default
        with observation statistics of its own, to load published weights or a checkpoint into."""
        if obs_norm is None:
            obs_norm = learner_cfg.obs_norm
        renorm = batch_renorm_options(learner_cfg) if learner_cfg.critic == "crossq" else None
        return cls(obs_dim, act_dim, learner_cfg.hidden_sizes, action_low, action_high, learner_cfg.obs_clip,
                   obs_norm, learner_cfg.obs_symlog, renorm)

    @classmethod
    def trunk_layers(cls, weights: Mapping[str, object]) -> list[tuple[str, str]]:
        """The trunk's layers in a state dict of this network, in order: ("linear", name) for a Linear
        layer (keys name.weight, name.bias), ("renorm", name) for a BatchRenorm (its running statistics
        too). ReLUs hold no keys: one follows every Linear layer but the last."""
        prefix = f"{cls.TRUNK}."
        indices = sorted({int(key[len(prefix):].split(".", 1)[0]) for key in weights if key.startswith(prefix)})
        layers = []
        for index in indices:
            name = f"{prefix}{index}"
            kind = "renorm" if f"{name}.{BatchRenorm.RUNNING_MEAN}" in weights else "linear"
            layers.append((kind, name))
        return layers

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + self.OBS_SYMLOG
        if key not in state_dict:  # weights from before learner.obs_symlog existed: off
            state_dict[key] = torch.zeros(())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.symlog_input = bool(self.obs_symlog)

    @classmethod
    def norm_key(cls, name: str) -> str:
        """The state-dict key of one of the ObsNormalizer's buffers."""
        return f"{cls.OBS_NORM}.{name}"

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = network_input(obs, self.obs_norm, self.obs_clip, self.symlog_input)
        mean, log_std = self.trunk(x).split(self.act_dim, dim=-1)
        return mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)

    def sample(self, obs: torch.Tensor, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """A reparameterised action (in env units) and the log-probability of its normalized form."""
        mean, log_std = self(obs)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        u = mean + log_std.exp() * noise
        action = torch.tanh(u) * self.action_scale + self.action_bias
        return action, squashed_log_prob(u, mean, log_std, noise)

    def deterministic(self, obs: torch.Tensor) -> torch.Tensor:
        mean, _ = self(obs)
        return torch.tanh(mean) * self.action_scale + self.action_bias

    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool = False,
            generator: torch.Generator | None = None) -> np.ndarray:
        """Actions for a batch of observations, as float32 numpy (for env stepping), in eval mode."""
        obs_t = torch.as_tensor(obs, dtype=torch.float32, device=self.action_scale.device)
        with evaluating(self):
            action = self.deterministic(obs_t) if deterministic else self.sample(obs_t, generator)[0]
        return action.cpu().numpy()


class EnsembleLinear(nn.Module):
    """`n` independent linear layers applied as one batched matmul: x [n, B, in] -> [n, B, out]."""

    def __init__(self, n: int, fan_in: int, fan_out: int):
        super().__init__()
        bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default initialisation, per member
        self.weight = nn.Parameter(torch.empty(n, fan_in, fan_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n, 1, fan_out).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.shape[-1] == 1:
            # A one-column output as multiply-and-sum: CPU bmm with a single output column (and its
            # backward) is several times slower than this.
            return (x * self.weight.transpose(1, 2)).sum(-1, keepdim=True) + self.bias
        return torch.baddbmm(self.bias, x, self.weight)


class TwinCritic(nn.Module):
    """Q_1 and Q_2 with separate weights, computed together: returns [2, B].

    `norm`: none (plain MLP), `layernorm` (LayerNorm after each hidden Linear, before its ReLU, as BRO
    does), or `renorm` (CrossQ: batch renormalization of the input and after each ReLU; `renorm` holds
    BatchRenorm's keyword arguments)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_sizes: Sequence[int], num_q: int = 2,
                 obs_clip: float | None = None, obs_norm: ObsNormalizer | None = None, obs_symlog: bool = False,
                 norm: str = "none", renorm: Mapping | None = None):
        super().__init__()
        if norm not in ("none", "layernorm", "renorm"):
            raise ValueError(f"critic norm must be none, layernorm or renorm, got {norm!r}")
        self.num_q, self.norm = num_q, norm
        self.register_buffer("obs_clip", torch.tensor(NO_CLIP if obs_clip is None else float(obs_clip)))
        self.obs_norm, self.obs_symlog = obs_norm, bool(obs_symlog)
        sizes = [obs_dim + act_dim, *hidden_sizes, 1]
        self.layers = nn.ModuleList(EnsembleLinear(num_q, i, o) for i, o in zip(sizes[:-1], sizes[1:]))
        if norm == "layernorm":
            self.norms = nn.ModuleList(EnsembleLayerNorm(num_q, width) for width in hidden_sizes)
        elif norm == "renorm":
            renorm = dict(renorm or {})
            self.input_norm = BatchRenorm(sizes[0], num_q, **renorm)
            self.norms = nn.ModuleList(BatchRenorm(width, num_q, **renorm) for width in hidden_sizes)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        obs = network_input(obs, self.obs_norm, self.obs_clip, self.obs_symlog)
        x = torch.cat([obs, action], dim=-1).expand(self.num_q, *obs.shape[:-1], -1)
        if self.norm == "renorm":
            x = self.input_norm(x)
        for i, layer in enumerate(self.layers[:-1]):
            x = layer(x)
            if self.norm == "layernorm":
                x = self.norms[i](x)
            x = F.relu(x, inplace=self.norm != "layernorm")  # in place where nothing's backward needs the input
            if self.norm == "renorm":
                x = self.norms[i](x)
        return self.layers[-1](x).squeeze(-1)


def batch_renorm_options(learner_cfg) -> dict:
    """BatchRenorm's keyword arguments from a config's learner section."""
    return {"momentum": learner_cfg.batch_renorm_momentum, "warmup": learner_cfg.batch_renorm_warmup}
