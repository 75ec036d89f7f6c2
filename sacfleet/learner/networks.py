"""SAC networks: the squashed Gaussian policy network (SAC's actor) and the twin critic evaluated as one
batched ensemble."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0
_LOG_2 = math.log(2.0)
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def mlp(sizes: Sequence[int]) -> nn.Sequential:
    """Linear layers with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU(inplace=True))  # the Linear before it does not need its output
    return nn.Sequential(*layers)


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
    # trunk's layers (an mlp(): Linear layers at the even indices of an nn.Sequential, ReLUs between them).
    OBS_CLIP, OBS_SYMLOG, ACTION_SCALE, ACTION_BIAS = "obs_clip", "obs_symlog", "action_scale", "action_bias"
    OBS_NORM = "obs_norm"
    TRUNK = "trunk"

    def __init__(self, obs_dim: int, act_dim: int, hidden_sizes: Sequence[int],
                 action_low: np.ndarray, action_high: np.ndarray, obs_clip: float | None = None,
                 obs_norm: ObsNormalizer | bool | None = None, obs_symlog: bool = False):
        """`obs_norm`: the learner's shared ObsNormalizer, True for one of this network's own (to load
        published weights into), or None."""
        super().__init__()
        self.act_dim = act_dim
        # Buffers, so that actors loading the learner's weights see observations as the learner does.
        self.register_buffer(self.OBS_CLIP, torch.tensor(NO_CLIP if obs_clip is None else float(obs_clip)))
        self.register_buffer(self.OBS_SYMLOG, torch.tensor(float(obs_symlog)))
        self.symlog_input = bool(obs_symlog)  # the buffer's value, read without a device sync
        self.obs_norm = ObsNormalizer(obs_dim) if obs_norm is True else (obs_norm if isinstance(obs_norm, ObsNormalizer) else None)
        self.trunk = mlp([obs_dim, *hidden_sizes, 2 * act_dim])
        low = torch.tensor(np.asarray(action_low, dtype=np.float32))  # copies: the bounds may be read-only
        high = torch.tensor(np.asarray(action_high, dtype=np.float32))
        self.register_buffer(self.ACTION_SCALE, (high - low) / 2.0)
        self.register_buffer(self.ACTION_BIAS, (high + low) / 2.0)

    @classmethod
    def layer_keys(cls, weights: Mapping[str, object]) -> list[tuple[str, str]]:
        """(weight, bias) keys of the trunk's linear layers in a state dict of this network, in order."""
        keys: list[tuple[str, str]] = []
        while f"{cls.TRUNK}.{2 * len(keys)}.weight" in weights:
            name = f"{cls.TRUNK}.{2 * len(keys)}"
            keys.append((f"{name}.weight", f"{name}.bias"))
        return keys

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
        """Actions for a batch of observations, as float32 numpy (for env stepping)."""
        obs_t = torch.as_tensor(obs, dtype=torch.float32, device=self.action_scale.device)
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
    """Q_1 and Q_2 with separate weights, computed together: returns [2, B]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_sizes: Sequence[int], num_q: int = 2,
                 obs_clip: float | None = None, obs_norm: ObsNormalizer | None = None, obs_symlog: bool = False):
        super().__init__()
        self.num_q = num_q
        self.register_buffer("obs_clip", torch.tensor(NO_CLIP if obs_clip is None else float(obs_clip)))
        self.obs_norm, self.obs_symlog = obs_norm, bool(obs_symlog)
        sizes = [obs_dim + act_dim, *hidden_sizes, 1]
        self.layers = nn.ModuleList(EnsembleLinear(num_q, i, o) for i, o in zip(sizes[:-1], sizes[1:]))

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        obs = network_input(obs, self.obs_norm, self.obs_clip, self.obs_symlog)
        x = torch.cat([obs, action], dim=-1).expand(self.num_q, *obs.shape[:-1], -1)
        for layer in self.layers[:-1]:
            x = F.relu(layer(x), inplace=True)  # in place: the layer's backward does not need its output
        return self.layers[-1](x).squeeze(-1)
