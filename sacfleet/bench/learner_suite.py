"""The learner suite: SAC updates/s of our update against a naive reference measured in the same
run, and the FLOP rate ours achieves against plain matmuls of the same shapes. Needs only torch
and numpy, so that it runs on GPU machines without Ray or gymnasium."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal

from sacfleet.bench import Record
from sacfleet.learner.batch import Batch
from sacfleet.learner.compiled import accelerate, resolve_compile
from sacfleet.learner.prefetch import Prefetcher
from sacfleet.learner.publish import PolicyPublisher
from sacfleet.learner.sac import SACLearner, matmul_precision, set_matmul_precision

# HalfCheetah-v5's shapes with the MuJoCo presets' networks: the learner that limits a fleet.
OBS_DIM, ACT_DIM, HIDDEN = 17, 6, (256, 256)
BATCH_SIZES = (256, 512, 1024, 2048, 4096)
BLOCK = 8  # updates per block in the fleet: learner.prefetch_batches' default (a test checks they agree)
PUBLISH_INTERVAL = 10  # learner.publish_interval's default, as BLOCK


class NaiveSAC:
    """The update as the reference documents write it: two critic modules run one after the other,
    Adam stepping parameter by parameter, the actor loss back-propagating into the critics' weights,
    Polyak averaging one tensor at a time, and six `.item()` host syncs every update."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...], device: torch.device):
        def mlp(sizes):
            layers: list[nn.Module] = []
            for i in range(len(sizes) - 1):
                layers += [nn.Linear(sizes[i], sizes[i + 1]), nn.ReLU() if i < len(sizes) - 2 else nn.Identity()]
            return nn.Sequential(*layers).to(device)

        self.trunk = mlp([obs_dim, *hidden])
        self.trunk.append(nn.ReLU())
        self.mu, self.log_std = nn.Linear(hidden[-1], act_dim).to(device), nn.Linear(hidden[-1], act_dim).to(device)
        self.q1, self.q2 = mlp([obs_dim + act_dim, *hidden, 1]), mlp([obs_dim + act_dim, *hidden, 1])
        self.q1_target, self.q2_target = copy.deepcopy(self.q1), copy.deepcopy(self.q2)
        self.log_alpha = torch.zeros((), device=device, requires_grad=True)
        actor_params = [*self.trunk.parameters(), *self.mu.parameters(), *self.log_std.parameters()]
        self.actor_optim = torch.optim.Adam(actor_params, lr=3e-4, foreach=False)
        self.q_optim = torch.optim.Adam([*self.q1.parameters(), *self.q2.parameters()], lr=3e-4, foreach=False)
        self.alpha_optim = torch.optim.Adam([self.log_alpha], lr=3e-4, foreach=False)
        self.target_entropy = -float(act_dim)

    def sample(self, obs):
        h = self.trunk(obs)
        dist = Normal(self.mu(h), self.log_std(h).clamp(-20, 2).exp())
        u = dist.rsample()
        a = torch.tanh(u)
        log_prob = dist.log_prob(u).sum(-1, keepdim=True) - torch.log(1 - a.pow(2) + 1e-6).sum(-1, keepdim=True)
        return a, log_prob

    def update(self, batch: Batch) -> dict[str, float]:
        alpha = self.log_alpha.exp()
        reward, done = batch.reward[:, None], batch.terminated[:, None]
        with torch.no_grad():
            next_a, next_log_prob = self.sample(batch.next_obs)
            x_next = torch.cat([batch.next_obs, next_a], -1)
            q_next = torch.min(self.q1_target(x_next), self.q2_target(x_next)) - alpha * next_log_prob
            backup = reward + 0.99 * (1 - done) * q_next
        x = torch.cat([batch.obs, batch.action], -1)
        q_loss = F.mse_loss(self.q1(x), backup) + F.mse_loss(self.q2(x), backup)
        self.q_optim.zero_grad()
        q_loss.backward()
        self.q_optim.step()

        a, log_prob = self.sample(batch.obs)
        x_pi = torch.cat([batch.obs, a], -1)
        q_pi = torch.min(self.q1(x_pi), self.q2(x_pi))
        actor_loss = (alpha.detach() * log_prob - q_pi).mean()
        self.actor_optim.zero_grad()
        actor_loss.backward()
        self.actor_optim.step()

        alpha_loss = -(self.log_alpha * (log_prob + self.target_entropy).detach()).mean()
        self.alpha_optim.zero_grad()
        alpha_loss.backward()
        self.alpha_optim.step()

        with torch.no_grad():
            for net, target in ((self.q1, self.q1_target), (self.q2, self.q2_target)):
                for p, p_target in zip(net.parameters(), target.parameters()):
                    p_target.mul_(0.995).add_(0.005 * p)
        return {"critic_loss": q_loss.item(), "actor_loss": actor_loss.item(), "alpha": alpha.item(),
                "alpha_loss": alpha_loss.item(), "log_prob": log_prob.mean().item(), "q": q_pi.mean().item()}


def random_batch(batch_size: int, obs_dim: int, act_dim: int, device: torch.device, seed: int = 0) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device)
    return Batch(obs=rand(batch_size, obs_dim), action=rand(batch_size, act_dim).clamp(-1, 1),
                 reward=rand(batch_size), next_obs=rand(batch_size, obs_dim),
                 terminated=(torch.rand(batch_size, generator=gen) < 0.01).float().to(device))


def matmul_shapes(batch_size: int, obs_dim: int, act_dim: int, hidden: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """Every (m, k, n) matmul of one of our SAC updates, with repeats: forward, input-gradient and
    weight-gradient products of the actor and both critics, as `SACLearner.update` runs them."""
    b = batch_size
    actor = list(zip([obs_dim, *hidden], [*hidden, 2 * act_dim]))
    critic = list(zip([obs_dim + act_dim, *hidden], [*hidden, 1]))

    def forward(layers):
        return [(b, i, o) for i, o in layers]

    def grad_input(layers, first_too):
        return [(b, o, i) for j, (i, o) in enumerate(layers) if first_too or j > 0]

    def grad_weight(layers):
        return [(i, b, o) for i, o in layers]

    shapes = forward(actor) + 2 * forward(critic)                                      # target
    shapes += 2 * (forward(critic) + grad_input(critic, False) + grad_weight(critic))  # critic loss
    shapes += forward(actor) + 2 * (forward(critic) + grad_input(critic, True))        # actor loss, critics frozen
    shapes += grad_input(actor, False) + grad_weight(actor)
    return shapes


def flops(shapes: list[tuple[int, int, int]]) -> float:
    return float(sum(2 * m * k * n for m, k, n in shapes))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(step: Callable[[], object], device: torch.device, seconds: float, warmup: int = 5) -> float:
    """Calls of `step` per second, timed for at least `seconds` after `warmup` untimed calls."""
    for _ in range(warmup):
        step()
    _sync(device)
    calls, start = 0, time.perf_counter()
    while True:
        for _ in range(max(1, calls // 4)):
            step()
            calls += 1
        _sync(device)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return calls / elapsed


def best_rates(steps: dict[str, Callable[[], object]], device: torch.device, seconds: float,
               rounds: int) -> dict[str, float]:
    """The best calls/s of each step over `rounds` short trials, the steps taking turns, so that a
    noisy neighbour or a frequency change hits all of them alike rather than one."""
    for step in steps.values():
        rate(step, device, 0.0, warmup=10)
    best = dict.fromkeys(steps, 0.0)
    for _ in range(rounds):
        for name, step in steps.items():
            best[name] = max(best[name], rate(step, device, seconds / rounds, warmup=1))
    return best


def matmul_step(shapes: list[tuple[int, int, int]], device: torch.device) -> Callable[[], None]:
    """Plain `torch.mm` over the same shapes as the update, outputs preallocated."""
    distinct = sorted(set(shapes))
    counts = {s: shapes.count(s) for s in distinct}
    operands = {s: (torch.randn(s[0], s[1], device=device), torch.randn(s[1], s[2], device=device),
                    torch.empty(s[0], s[2], device=device)) for s in distinct}

    def step():
        for s in distinct:
            a, b, out = operands[s]
            for _ in range(counts[s]):
                torch.mm(a, b, out=out)

    return step


def sample_answers(batch_size: int, k: int, count: int = 4, seed: int = 0) -> list[dict]:
    """`count` sample answers of k batches as a replay shard sends them (read-only float32 arrays,
    terminated as bool): what the prefetcher turns into blocks in the fleet."""
    rng = np.random.default_rng(seed)
    answers = []
    for _ in range(count):
        data = {"obs": rng.standard_normal((k, batch_size, OBS_DIM), dtype=np.float32),
                "action": rng.uniform(-1, 1, (k, batch_size, ACT_DIM)).astype(np.float32),
                "reward": rng.standard_normal((k, batch_size), dtype=np.float32),
                "next_obs": rng.standard_normal((k, batch_size, OBS_DIM), dtype=np.float32),
                "terminated": rng.random((k, batch_size)) < 0.01}
        for array in data.values():
            array.setflags(write=False)
        answers.append({"shard": 0, "data": data, "keys": None, "weights": None})
    return answers


class FedUpdates:
    """The fleet learner's update thread without Ray: blocks come through a Prefetcher (its thread
    packing host arrays into one buffer per block and moving it to the device) from answers already
    in memory. One call takes one block, updates on it and snapshots the policy when a publish
    interval ended; `close()` stops the thread."""

    def __init__(self, learner: SACLearner, batch_size: int, k: int, device: torch.device):
        answers = sample_answers(batch_size, k)
        self.turn = 0

        def source(should_stop):
            self.turn += 1
            return answers[self.turn % len(answers)]

        self.learner = learner
        self.publisher = PolicyPublisher(learner, PUBLISH_INTERVAL)
        self.prefetcher = Prefetcher(source, device, depth=2, keep_keys=False)
        self.prefetcher.start()

    def __call__(self) -> None:
        item = self.prefetcher.get(timeout=10.0)
        if item is None:
            raise RuntimeError("bench learner: the prefetch thread delivered no block in 10 s")
        before = self.learner.updates
        self.learner.update_block(item.block)
        self.publisher.after_block(before)

    def close(self) -> None:
        self.prefetcher.stop()


@dataclass
class LearnerFigures:
    device: str
    batch_size: int
    sacfleet: float
    naive: float
    matmul_flop_rate: float
    update_flops: float
    block: float  # updates/s, k at a time
    fed: float  # updates/s, k at a time through the prefetcher
    precision: str = "float32"

    @property
    def speedup(self) -> float:
        return self.sacfleet / self.naive

    @property
    def flop_fraction(self) -> float:
        return self.sacfleet * self.update_flops / self.matmul_flop_rate


def _ours(device: torch.device, batch_size: int, k: int, shapes: tuple = (OBS_DIM, ACT_DIM, HIDDEN),
          compile_mode: str = "auto", **options) -> tuple[SACLearner, Batch, Batch]:
    """The suite's learner for (obs_dim, act_dim, hidden sizes) `shapes` (and SACLearner `options`), a batch
    and a block of k."""
    obs_dim, act_dim, hidden = shapes
    torch.manual_seed(0)
    batch = random_batch(batch_size, obs_dim, act_dim, device)
    block = Batch.stack([random_batch(batch_size, obs_dim, act_dim, device, seed=i) for i in range(k)])
    learner = SACLearner(obs_dim, act_dim, -np.ones(act_dim), np.ones(act_dim), hidden_sizes=tuple(hidden),
                         device=device, **options)
    if resolve_compile(compile_mode, learner.device):
        accelerate(learner)
    return learner, batch, block


def measure(device: torch.device, batch_size: int, seconds: float, compile_mode: str = "auto",
            rounds: int = 5, k: int = BLOCK, precision: str = "float32") -> LearnerFigures:
    """Ours (one update per call, a block of k per call, and blocks fed through the prefetcher), the
    naive reference and the matmul baseline on the same device, thread count and matmul precision,
    each timed for about `seconds` in all."""
    set_matmul_precision(precision)
    try:
        ours, batch, block = _ours(device, batch_size, k, compile_mode=compile_mode)
        naive = NaiveSAC(OBS_DIM, ACT_DIM, HIDDEN, device)
        shapes = matmul_shapes(batch_size, OBS_DIM, ACT_DIM, HIDDEN)
        fed = FedUpdates(ours, batch_size, k, device)
        try:
            best = best_rates({"sacfleet": lambda: ours.update(batch), "block": lambda: ours.update_block(block),
                               "fed": fed, "naive": lambda: naive.update(batch),
                               "matmul": matmul_step(shapes, device)}, device, seconds, rounds)
        finally:
            fed.close()
        ours.check_finite()
        ours.metrics.read()  # the learner reads its metrics once per logging period; do it once here
        return LearnerFigures(str(device.type), batch_size, best["sacfleet"], best["naive"],
                              best["matmul"] * flops(shapes), flops(shapes), k * best["block"], k * best["fed"],
                              matmul_precision())
    finally:
        set_matmul_precision("float32")


def update_rates(device: torch.device, batch_size: int, seconds: float, threads: int | None = None,
                 k: int = BLOCK, precision: str = "float32", shapes: tuple = (OBS_DIM, ACT_DIM, HIDDEN),
                 rounds: int = 5) -> tuple[float, float]:
    """(updates/s one at a time, updates/s in blocks of k) of the suite's learner on `device` with
    `threads` torch threads and (obs_dim, act_dim, hidden sizes) `shapes`: what the e2e suite
    compares a fleet's learner with."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    set_matmul_precision(precision)
    try:
        ours, batch, block = _ours(device, batch_size, k, shapes)
        best = best_rates({"single": lambda: ours.update(batch), "block": lambda: ours.update_block(block)},
                          device, seconds, rounds)
        ours.check_finite()
        return best["single"], k * best["block"]
    finally:
        torch.set_num_threads(before)
        set_matmul_precision("float32")


# learner.critic's modes as the suite measures them: each with its own settings (CrossQ's policy delay
# and, on CUDA, its published critic width too), at the batch size the presets use.
CRITIC_MODES = {"mlp": {}, "layernorm": {"critic": "layernorm"},
                "crossq": {"critic": "crossq", "policy_delay": 3, "adam_beta1": 0.5}}
CROSSQ_WIDE = {"critic": "crossq", "policy_delay": 3, "adam_beta1": 0.5, "critic_hidden_sizes": (2048, 2048)}


def critic_mode_rates(device: torch.device, batch_size: int, seconds: float, k: int = BLOCK,
                      rounds: int = 5, compile_mode: str = "auto") -> dict[str, float]:
    """Updates/s in blocks of k of each learner.critic mode at the suite's shapes, the modes taking turns
    (and CrossQ with its published 2048-wide critics on CUDA, where it is meant to run)."""
    modes = dict(CRITIC_MODES)
    if device.type == "cuda":
        modes["crossq 2048"] = CROSSQ_WIDE
    blocks = {}
    for name, options in modes.items():
        learner, _, block = _ours(device, batch_size, k, compile_mode=compile_mode, **options)
        blocks[name] = (learner, block)
    best = best_rates({name: (lambda learner=learner, block=block: learner.update_block(block))
                       for name, (learner, block) in blocks.items()}, device, seconds, rounds)
    for learner, _ in blocks.values():
        learner.check_finite()
    return {name: k * rate for name, rate in best.items()}


def precisions(device: torch.device) -> tuple[str, ...]:
    """learner.matmul_precision's values the suite measures: tf32 only changes CUDA matmuls."""
    return ("float32", "tf32") if device.type == "cuda" else ("float32",)


def default_devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def run(devices: list[str] | None = None, batch_sizes: tuple[int, ...] = BATCH_SIZES, seconds: float = 1.0,
        echo: Callable[[str], None] = print, compile_mode: str = "auto", **_) -> list[Record]:
    """`compile_mode`: learner.compile for the learners measured (auto: compiled on CUDA only)."""
    records: list[Record] = []
    for name in devices or default_devices():
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("bench learner: --devices names cuda, but torch sees no CUDA device")
        for batch_size in batch_sizes:
            for precision in precisions(device):
                fig = measure(device, batch_size, seconds, compile_mode=compile_mode, precision=precision)
                echo(f"learner {fig.device} batch {batch_size} ({fig.precision}): sacfleet {fig.sacfleet:,.0f} "
                     f"updates/s, naive {fig.naive:,.0f} ({fig.speedup:.2f}x); {fig.flop_fraction:.2f} of the "
                     f"matmul FLOP rate; blocks of {BLOCK}: {fig.block:,.0f} updates/s, fed by the prefetcher "
                     f"{fig.fed:,.0f} ({fig.fed / fig.block:.2f} of blocks)")
                records += _records(fig)
        batch_size = batch_sizes[0]
        modes = critic_mode_rates(device, batch_size, seconds * len(CRITIC_MODES), compile_mode=compile_mode)
        compiled = " (compiled)" if resolve_compile(compile_mode, device) else ""
        echo(f"learner {device.type} batch {batch_size}{compiled}, blocks of {BLOCK}, by learner.critic: " + ", ".join(
            f"{name} {value:,.0f} updates/s ({value / modes['mlp']:.2f}x mlp)" for name, value in modes.items()))
        common = dict(suite="learner", device=device.type, batch_size=batch_size)
        for name, value in modes.items():
            records.append(Record(name=f"critic {name}", metric="updates_per_s", value=value, unit="updates/s",
                                  **common))
            records.append(Record(name=f"critic {name}", metric="ratio_to_mlp", value=value / modes["mlp"],
                                  unit="x", **common))
    return records


def _records(fig: LearnerFigures) -> list[Record]:
    """float32 figures under their plain names; tf32 ones (CUDA) with the precision after the name."""
    common = dict(suite="learner", device=fig.device, batch_size=fig.batch_size)
    tag = "" if fig.precision == "float32" else f" {fig.precision}"
    return [
        Record(name=f"sacfleet{tag}", metric="updates_per_s", value=fig.sacfleet, unit="updates/s", **common),
        Record(name=f"naive{tag}", metric="updates_per_s", value=fig.naive, unit="updates/s", **common),
        Record(name=f"sacfleet{tag}", metric="speedup_vs_naive", value=fig.speedup, unit="x", **common),
        Record(name=f"sacfleet{tag}", metric="flop_rate", value=fig.sacfleet * fig.update_flops / 1e9,
               unit="GFLOP/s", **common),
        Record(name=f"matmul{tag}", metric="flop_rate", value=fig.matmul_flop_rate / 1e9, unit="GFLOP/s", **common),
        Record(name=f"sacfleet{tag}", metric="flop_fraction_of_matmul", value=fig.flop_fraction, unit="ratio",
               **common),
        Record(name=f"sacfleet block {BLOCK}{tag}", metric="updates_per_s", value=fig.block, unit="updates/s",
               **common),
        Record(name=f"sacfleet fed {BLOCK}{tag}", metric="updates_per_s", value=fig.fed, unit="updates/s", **common),
        Record(name=f"sacfleet fed {BLOCK}{tag}", metric="fraction_of_block", value=fig.fed / fig.block,
               unit="ratio", **common),
    ]


def threads_note() -> str:
    return f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"

