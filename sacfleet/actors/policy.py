"""The policy as env actors run it: the learner's policy network (`learner.networks.PolicyNetwork`)
evaluated in numpy from its published weights. At the batch of one actor's envs, torch's per-operator
overhead costs several times the arithmetic (about 180 us against 45 us for 8 HalfCheetah envs)."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from sacfleet.learner.networks import (BATCH_RENORM_EPS, LOG_STD_MAX, LOG_STD_MIN, OBS_NORM_EPS, BatchRenorm, ObsNormalizer,
                                       PolicyNetwork)


class NumpyPolicy:
    """a = scale * tanh(mean + std * noise) + bias, with (mean, log std) from the MLP trunk (on the
    observation standardized by the published statistics, if any, clipped, and symlog if the learner's
    is; batch renormalization, if any, in eval mode), or
    scale * tanh(mean) + bias when deterministic; the same function as `PolicyNetwork.sample` and
    `PolicyNetwork.deterministic`, in float32."""

    def __init__(self, weights: Mapping[str, np.ndarray]):
        layers = PolicyNetwork.trunk_layers(weights)
        if not any(kind == "linear" for kind, _ in layers):
            raise ValueError(f"policy weights have no trunk layers (expected keys {PolicyNetwork.TRUNK}.<i>.weight)")
        f32 = lambda name: np.ascontiguousarray(weights[name], dtype=np.float32)  # noqa: E731
        # Each layer as (matrix or None, scale or None, shift): a Linear layer transposed once, so that it is
        # one (batch x in) @ (in x out) product; a batch renormalization (CrossQ) as its eval-mode affine map
        # x * scale + shift, folded from its running statistics.
        self.layers: list[tuple[np.ndarray | None, np.ndarray | None, np.ndarray]] = []
        for kind, name in layers:
            if kind == "linear":
                self.layers.append((np.ascontiguousarray(f32(f"{name}.weight").T), None, f32(f"{name}.bias")))
            else:
                variance = np.asarray(weights[f"{name}.{BatchRenorm.RUNNING_VAR}"], dtype=np.float64)
                scale = np.asarray(weights[f"{name}.weight"], np.float64) / np.sqrt(variance + BATCH_RENORM_EPS)
                shift = np.asarray(weights[f"{name}.bias"], np.float64) - np.asarray(
                    weights[f"{name}.{BatchRenorm.RUNNING_MEAN}"], np.float64) * scale
                self.layers.append((None, scale.astype(np.float32), shift.astype(np.float32)))
        self.last_linear = max(i for i, (matrix, _, _) in enumerate(self.layers) if matrix is not None)
        self.obs_clip = float(weights[PolicyNetwork.OBS_CLIP])
        self.obs_symlog = bool(weights.get(PolicyNetwork.OBS_SYMLOG, 0.0))
        # The learner's observation statistics (learner.obs_norm), as a shift and a scale in float32.
        self.obs_shift, self.obs_scale = None, None
        mean_key = PolicyNetwork.norm_key(ObsNormalizer.MEAN)
        if mean_key in weights:
            variance = np.asarray(weights[PolicyNetwork.norm_key(ObsNormalizer.VAR)], dtype=np.float32)
            self.obs_shift = f32(mean_key)
            self.obs_scale = (1.0 / np.sqrt(variance + np.float32(OBS_NORM_EPS))).astype(np.float32)
        self.action_scale, self.action_bias = f32(PolicyNetwork.ACTION_SCALE), f32(PolicyNetwork.ACTION_BIAS)
        self.act_dim = self.action_scale.size

    def __call__(self, obs: np.ndarray, rng: np.random.Generator | None = None,
                 deterministic: bool = False) -> np.ndarray:
        h = np.asarray(obs, dtype=np.float32)
        if self.obs_shift is not None:
            h = (h - self.obs_shift) * self.obs_scale
        h = np.clip(h, -self.obs_clip, self.obs_clip)
        if self.obs_symlog:
            h = np.sign(h) * np.log1p(np.abs(h))
        for i, (matrix, scale, shift) in enumerate(self.layers):
            if matrix is None:
                h = h * scale
            else:
                h = h @ matrix
            h += shift
            if matrix is not None and i < self.last_linear:
                np.maximum(h, 0.0, out=h)
        mean, log_std = h[:, :self.act_dim], h[:, self.act_dim:]
        if deterministic:
            u = mean
        else:
            if rng is None:
                raise ValueError("a stochastic action needs an rng")
            noise = rng.standard_normal(mean.shape, dtype=np.float32)
            u = mean + np.exp(np.clip(log_std, LOG_STD_MIN, LOG_STD_MAX)) * noise
        return np.tanh(u) * self.action_scale + self.action_bias
