"""Training health: checks every progress record of a run (fleet or in-process) for the failure
modes reference document 004 teaches users to look for ("What can go wrong") and for the fleet's
own, and names each symptom with its usual cause. Pure Python; both trainers feed it the same
metric names.

A check reads one number from a record (its *measure*, logged as `health/<check>`) and compares it
with a limit from the config's `health` section. It warns after `confirm` bad readings in a row
and clears after `CLEAR_AFTER` good ones, so a value hovering at its limit does not flap. A
learner that diverges is not a warning: the learner stops the run (see `learner.sac.LearnerDiverged`)
and the monitor records it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

CLEAR_AFTER = 3  # good readings in a row before an active warning clears


@dataclass(frozen=True)
class RunFacts:
    """What the checks need to know about a run besides its metrics."""

    gamma: float
    reward_scale: float
    act_dim: int
    target_entropy: float
    init_alpha: float
    learn_alpha: bool
    learning_starts: int
    policy_starts: int  # env steps before the policy acts: the random phase and the critic warm-up
    total_env_steps: int
    log_interval: int
    samples_per_insert: float
    expected_lag: float | None = None  # fleet runs only, in learner updates

    @classmethod
    def from_config(cls, cfg, act_dim: int, fleet: bool) -> "RunFacts":
        learner = cfg.learner
        target = -float(act_dim) if learner.target_entropy is None else float(learner.target_entropy)
        return cls(gamma=learner.gamma, reward_scale=learner.reward_scale, act_dim=act_dim, target_entropy=target,
                   init_alpha=learner.init_alpha, learn_alpha=learner.learn_alpha,
                   learning_starts=cfg.train.learning_starts, total_env_steps=cfg.train.total_env_steps,
                   policy_starts=cfg.train.learning_starts + math.ceil(
                       learner.critic_warmup * learner.batch_size / cfg.replay.samples_per_insert),
                   log_interval=cfg.train.log_interval, samples_per_insert=cfg.replay.samples_per_insert,
                   expected_lag=expected_policy_lag(cfg) if fleet else None)


def expected_policy_lag(cfg) -> float:
    """Learner updates between the policy that made the newest stored transitions and the learner's
    current one, as the fleet's settings imply: a published policy is up to publish_interval updates
    old, or a block of prefetch_batches updates where that is more (the learner publishes between
    blocks); an actor pulls every weight_sync_interval of its steps, and its chunk waits up to
    chunk_length steps to fill and then max_in_flight chunks to be acknowledged, while the whole
    fleet's steps drive updates at samples_per_insert / batch_size per transition."""
    a = cfg.actors
    updates_per_transition = cfg.replay.samples_per_insert / cfg.learner.batch_size
    fleet_steps = a.num * a.envs_per_actor * (a.weight_sync_interval + a.chunk_length * (1 + a.max_in_flight))
    publish_every = max(cfg.learner.publish_interval, cfg.learner.prefetch_batches)
    return publish_every + updates_per_transition * fleet_steps


@dataclass
class Reading:
    measure: float  # what the check compares with its limit; logged as health/<check>
    bad: bool
    symptom: str = ""  # what is wrong, with the numbers, when bad
    cause: str = ""  # when the usual cause depends on the reading: replaces the check's own
    confirmed: bool = False  # a bad reading that warns without waiting for the check's `confirm`


def _have(values: Mapping[str, float], *keys: str) -> bool:
    return all(key in values and values[key] is not None and math.isfinite(values[key]) for key in keys)


class Check:
    name = ""
    cause = ""  # the usual cause and what to try, as reference document 004 gives them
    limit_key = ""  # the config key that sets the limit
    confirm = 1  # bad readings in a row before the check warns

    def __init__(self, facts: RunFacts, limits):
        self.facts, self.limits = facts, limits

    def read(self, env_steps: int, values: Mapping[str, float]) -> Reading | None:
        """None when the record lacks what this check reads (or it does not apply yet)."""
        raise NotImplementedError


class _RewardScale:
    """Largest |reward| seen in the learner's batches so far: the scale Q must stay within."""

    def __init__(self):
        self.reward_abs_max = 0.0

    def see(self, values: Mapping[str, float]) -> float:
        if _have(values, "train/reward_abs_max"):
            self.reward_abs_max = max(self.reward_abs_max, values["train/reward_abs_max"])
        return self.reward_abs_max


class QBlowup(Check):
    name, limit_key, confirm = "q_blowup", "health.q_bound_factor", 2
    cause = ("overestimation feedback: targets built on overestimated Q train the critics to overestimate further. "
             "Check that rewards are bounded, that learner.tau is small (0.005) and Polyak averaging runs, and try a "
             "lower learner.critic_lr")
    # Q far below every return the rewards allow is the other direction, and has another usual cause:
    # in the point-mass preset's old runaways (README, "Every seed learns") it followed early
    # policies that drove into far-away, costly states.
    cause_below = ("underestimation feedback: targets built on the critics' too-low values train them lower still, "
                   "the clipped double-Q minimum pulling the same way. It usually follows a runaway: early policies "
                   "that drive into far-away, costly states (training returns, rollout/ep_rew_mean, far below "
                   "eval/mean_reward) and critics extrapolating there. Try critic-only updates first "
                   "(learner.critic_warmup), bounded network inputs (learner.obs_symlog, learner.obs_clip), a longer "
                   "random phase (train.learning_starts) or a lower learner.critic_lr")

    def __init__(self, facts, limits):
        super().__init__(facts, limits)
        self.rewards = _RewardScale()

    def read(self, env_steps, values):
        r_max = self.rewards.see(values)
        if not _have(values, "train/q_mean", "train/ent_coef", "train/entropy") or self.facts.gamma >= 1 or r_max <= 0:
            return None
        f = self.facts
        # |Q| <= sum_t gamma^t (|scaled reward| + alpha |entropy bonus|), bounded per step by these.
        per_step = f.reward_scale * r_max + values["train/ent_coef"] * max(abs(values["train/entropy"]), f.act_dim)
        bound = per_step / (1.0 - f.gamma)
        q = values["train/q_mean"]
        ratio = abs(q) / bound
        return Reading(ratio, ratio > self.limits.q_bound_factor,
                       f"mean Q {q:.4g} is {ratio:.1f}x the largest value the rewards allow (|r| <= {r_max:.3g}, "
                       f"reward_scale {f.reward_scale:g}, gamma {f.gamma:g}: |Q| <= {bound:.3g})",
                       self.cause_below if q < 0 else self.cause)


class CriticDisagreement(Check):
    name, limit_key, confirm = "critic_disagreement", "health.critic_disagreement", 2
    cause = ("one Q-network is stuck or learns at another rate; both critics must be trained by one loss and "
             "stepped by one optimizer")

    def __init__(self, facts, limits):
        super().__init__(facts, limits)
        self.rewards = _RewardScale()

    def read(self, env_steps, values):
        r_max = self.rewards.see(values)
        if not _have(values, "train/q1_mean", "train/q2_mean") or self.facts.gamma >= 1 or r_max <= 0:
            return None
        q1, q2 = values["train/q1_mean"], values["train/q2_mean"]
        small, large = sorted((abs(q1), abs(q2)))
        # Q values near zero (early, or a task whose values are near zero) say nothing about agreement.
        scale = self.facts.reward_scale * r_max / (1.0 - self.facts.gamma)
        ratio = large / max(small, 0.01 * scale)
        bad = ratio >= self.limits.critic_disagreement and large >= 0.1 * scale
        return Reading(ratio, bad, f"the twin critics disagree by {ratio:.1f}x (mean Q1 {q1:.4g}, Q2 {q2:.4g})")


class ReturnProgress:
    """The return when learning began and the best since, shared by the checks that ask whether the
    agent has learned anything yet. It reads the return of recent training episodes (the 100-episode
    ep_rew_mean lags too far) and evaluations."""

    def __init__(self, learning_starts: int):
        self.learning_starts = learning_starts
        self.baseline: tuple[int, float] | None = None  # (env steps, recent return) when learning began
        self.best = -math.inf

    def see(self, env_steps: int, values: Mapping[str, float]) -> None:
        if env_steps < self.learning_starts:
            return
        training = "rollout/ep_rew_recent" if _have(values, "rollout/ep_rew_recent") else "rollout/ep_rew_mean"
        for key in (training, "eval/mean_reward"):
            if _have(values, key):
                if self.baseline is None and key == training:
                    self.baseline = (env_steps, values[key])
                self.best = max(self.best, values[key])

    @property
    def gain(self) -> float:
        return self.best - self.baseline[1] if self.baseline else 0.0

    def learned(self) -> bool:
        """The best return is clearly above where learning began (by 5% of its size)."""
        return self.baseline is not None and self.gain > 0.05 * abs(self.baseline[1])


class AlphaCollapse(Check):
    """Reference 004: ent_coef below 0.01 in the first 10k steps, the policy near-deterministic "before it
    learned anything useful". A temperature that falls once the return has improved is SAC at work
    (the point-mass preset's falls from 0.005 to 1e-4 while it learns the task)."""

    name, limit_key = "alpha_collapse", "health.min_ent_coef"
    cause = ("the policy became near-deterministic before it learned anything useful: the target entropy is too low "
             "or the temperature's learning rate too high. Check learner.target_entropy (default -|A|), try "
             "learner.alpha_lr 1e-4, or a fixed temperature (learner.learn_alpha=false) to isolate it")

    def __init__(self, facts, limits):
        super().__init__(facts, limits)
        self.returns = ReturnProgress(facts.learning_starts)

    def read(self, env_steps, values):
        f = self.facts
        self.returns.see(env_steps, values)
        early = env_steps <= f.learning_starts + self.limits.early_steps
        if not f.learn_alpha or not early or not _have(values, "train/ent_coef"):
            return None
        # Reference 004's 0.01 is a hundredth of SB3's initial 1.0; a preset may start low on purpose
        # (point mass: 0.005), so collapse is also falling to a hundredth of the start.
        limit = min(self.limits.min_ent_coef, f.init_alpha / 100)
        alpha = values["train/ent_coef"]
        return Reading(alpha, alpha < limit and not self.returns.learned(),
                       f"the temperature (ent_coef) fell to {alpha:.3g} after {env_steps:,} env steps, below "
                       f"{limit:.3g}, before the return improved (learner.init_alpha {f.init_alpha:g})")


class EntropyCollapse(Check):
    name, limit_key, confirm = "entropy_collapse", "health.entropy_margin", 2
    cause = ("the policy stopped exploring: its entropy is far below the target the temperature should hold it to. "
             "Usual causes: a fixed temperature too low (learner.learn_alpha=false), a learner.target_entropy "
             "far below -|A|, or a temperature that collapsed")

    def read(self, env_steps, values):
        if not _have(values, "train/entropy"):
            return None
        f = self.facts
        below = (f.target_entropy - values["train/entropy"]) / f.act_dim
        return Reading(below, below > self.limits.entropy_margin,
                       f"policy entropy {values['train/entropy']:.3g} is {below:.1f} nats per action dimension "
                       f"below its target {f.target_entropy:g}")


class ReturnStalled(Check):
    """The return flat since learning began (reference 004: "ep_rew_mean flatlines ... for the entire run").
    A run that learned and then levelled off is not stalled."""

    name, limit_key = "return_stalled", "health.stall_fraction"
    cause = ("the agent is not learning from what it collects: usually the wrong environment or observations "
             "without the information the task needs (a goal, say), rewards scaled to nothing "
             "(learner.reward_scale), or too little exploration (check train/ent_coef)")

    def __init__(self, facts, limits):
        super().__init__(facts, limits)
        self.returns = ReturnProgress(facts.learning_starts)

    def read(self, env_steps, values):
        f = self.facts
        self.returns.see(env_steps, values)
        if self.returns.baseline is None or not _have(values, "rollout/ep_rew_mean"):
            return None
        start, base = self.returns.baseline
        stretch = self.limits.stall_fraction * max(f.total_env_steps - f.learning_starts, 1)
        gain = self.returns.gain
        return Reading(gain, not self.returns.learned() and env_steps - start >= stretch,
                       f"the return has gained {gain:.3g} in {env_steps - start:,} env steps since learning began "
                       f"(recent episodes {base:.4g} then; ep_rew_mean {values['rollout/ep_rew_mean']:.4g} now)")


class SuccessStalled(Check):
    """Reference 004: "Success rate stalls below 50% for more than 200k steps"."""

    name, limit_key = "success_stalled", "health.stall_fraction"
    cause = ("insufficient exploration or replay sampling problems: check that train/ent_coef has not fallen below "
             "0.01 early, that train.learning_starts is not too high, and that learner.batch_size is reasonable (256)")

    def __init__(self, facts, limits):
        super().__init__(facts, limits)
        self.best = -math.inf
        self.since: int | None = None  # env steps at the last gain of 0.05 or more

    def read(self, env_steps, values):
        f = self.facts
        keys = [k for k in ("rollout/success_rate", "eval/success_rate") if _have(values, k)]
        if not keys or env_steps < f.learning_starts:
            return None
        rate = max(values[k] for k in keys)
        if self.since is None or rate >= self.best + 0.05:
            self.since = env_steps
        self.best = max(self.best, rate)
        stretch = self.limits.stall_fraction * max(f.total_env_steps - f.learning_starts, 1)
        return Reading(self.best, self.best < 0.5 and env_steps - self.since >= stretch,
                       f"the success rate has stayed at or below {self.best:.0%} for {env_steps - self.since:,} "
                       f"env steps")


def collapse_limit(best: float, gain: float, fraction: float) -> float:
    """The return below which a run that reached `best`, having gained `gain` over the random phase to
    get there, has collapsed: `fraction` of the larger of |best| and the gain below the best.
    Noise between evaluations of a learned policy stays well above it; a policy that lost most of
    what it learned (or, with returns near zero, one that costs several times what it did) falls below it."""
    return best - fraction * max(abs(best), gain)


class ReturnCollapsed(Check):
    """The return far below the best the run reached, after it reached it: a late collapse that no
    other check sees while the losses look sane. Evaluations and recent training episodes are each
    compared with their own best, counted once the policy acts (after the random phase and the critic
    warm-up); the gain to the best is measured from the random phase's mean training return, so an
    early runaway does not excuse a late collapse. An evaluation (many deterministic episodes) warns
    on its own; training returns must stay below the limit twice in a row."""

    name, limit_key, confirm = "return_collapsed", "health.collapse_fraction", 2
    cause = ("the policy unlearned what it had learned: usually critics that diverged in states the policy reached "
             "(check train/q_mean against the returns, and q_blowup) or a policy pushed by critics that have not "
             "caught up. checkpoint.best keeps the best-evaluated policy (checkpoints/best.pt, sacfleet eval --best); "
             "try learner.obs_norm, learner.obs_symlog or learner.critic_warmup")

    def __init__(self, facts, limits):
        super().__init__(facts, limits)
        self.random_phase: list[float] = []  # training returns before the policy acts
        self.baseline: float | None = None
        self.best: dict[str, tuple[int, float]] = {}  # source -> (env steps, best return)

    def limit(self, source: str) -> float | None:
        if source not in self.best or self.baseline is None:
            return None
        best = self.best[source][1]
        return collapse_limit(best, max(best - self.baseline, 0.0), self.limits.collapse_fraction)

    def read(self, env_steps, values):
        training = "rollout/ep_rew_recent" if _have(values, "rollout/ep_rew_recent") else "rollout/ep_rew_mean"
        if env_steps < self.facts.policy_starts + self.facts.log_interval:
            if _have(values, training):
                self.random_phase.append(values[training])
            return None
        if self.baseline is None:
            if self.random_phase:
                self.baseline = sum(self.random_phase) / len(self.random_phase)
            elif _have(values, training):  # no random phase (train.learning_starts=0): where learning began
                self.baseline = values[training]
            else:
                return None
        readings = []
        for key, source, what in (("eval/mean_reward", "eval", "the evaluation return"),
                                  (training, "training", "the training return")):
            if not _have(values, key):
                continue
            value = values[key]
            if source not in self.best or value > self.best[source][1]:
                self.best[source] = (env_steps, value)
            best_at, best = self.best[source]
            limit = self.limit(source)
            # The measure: how far below its best the return is, as a share of the allowed fall.
            measure = (best - value) / (best - limit) if best > limit else 0.0
            readings.append(Reading(measure, value < limit,
                                    f"{what} fell to {value:.4g} at {env_steps:,} env steps, far below the best "
                                    f"{best:.4g} it reached at {best_at:,} (limit {limit:.4g})",
                                    confirmed=source == "eval"))
        return max(readings, key=lambda reading: reading.measure) if readings else None


class ReplayRatioDrift(Check):
    name, limit_key, confirm = "replay_ratio_drift", "health.ratio_tolerance", 2
    cause = ("the rate limiter is not holding the replay ratio: check replay.error_buffer, and that every shard "
             "receives inserts (replay.num_shards no larger than the actors can feed)")

    def read(self, env_steps, values):
        f = self.facts
        # Over few inserts the limiter's error buffer is large against the samples taken: early on, and
        # after a shard is restored from an early snapshot (its counters start from that snapshot's).
        inserts = values.get("replay/ratio_inserts", env_steps - f.learning_starts)
        if not _have(values, "replay/samples_per_insert") or inserts < 5 * f.log_interval:
            return None
        measured = values["replay/samples_per_insert"]
        drift = abs(measured / f.samples_per_insert - 1.0)
        return Reading(drift, drift > self.limits.ratio_tolerance,
                       f"samples per insert is {measured:.4g} against its target {f.samples_per_insert:g} "
                       f"({drift:.0%} off)")


class PolicyLag(Check):
    name, limit_key, confirm = "policy_lag", "health.lag_factor", 2
    cause = ("actors act with old weights: a slow weight pull (actors.weight_sync_interval), long chunks "
             "(actors.chunk_length), inserts queued on a busy shard (add replay.num_shards), or an actor whose "
             "weight pulls fail")

    def read(self, env_steps, values):
        expected = self.facts.expected_lag
        if expected is None or not _have(values, "learner/policy_lag"):
            return None
        lag = values["learner/policy_lag"]
        ratio = lag / expected
        return Reading(ratio, ratio > self.limits.lag_factor,
                       f"policy lag {lag:.0f} updates is {ratio:.1f}x what the fleet's settings imply ({expected:.0f})")


class _Stall(Check):
    """A wait without a break, in seconds, read from `key`."""

    limit_key = "health.starved_seconds"
    key = ""
    symptom = ""  # formatted with {seconds}

    def read(self, env_steps, values):
        if not _have(values, self.key):
            return None
        seconds = values[self.key]
        return Reading(seconds, seconds >= self.limits.starved_seconds, self.symptom.format(seconds=seconds))


class ActorsStarved(_Stall):
    name, key = "actors_starved", "actors/insert_blocked_s"
    symptom = "an env actor's insert has been held back by the rate limiter for {seconds:.0f} s"
    cause = ("the rate limiter holds inserts back because the learner is not sampling: it may be stuck, failing, "
             "or far slower than collection (a GPU learner, fewer actors or a lower replay.samples_per_insert)")


class LearnerStarved(_Stall):
    name, key = "learner_starved", "learner/starved_s"
    symptom = "the learner has waited {seconds:.0f} s for a batch the rate limiter would allow"
    cause = ("the rate limiter waits for inserts: actors are failing, stuck or too slow for the update rate; add "
             "actors or actors.envs_per_actor, or lower replay.samples_per_insert")


CHECKS = (QBlowup, CriticDisagreement, AlphaCollapse, EntropyCollapse, ReturnStalled, ReturnCollapsed,
          SuccessStalled, ReplayRatioDrift, PolicyLag, ActorsStarved, LearnerStarved)


@dataclass
class HealthWarning:
    """One check's warning over the run: when it started, when it was last seen, and what it said."""

    check: str
    symptom: str
    cause: str
    limit_key: str
    first_env_steps: int
    last_env_steps: int
    readings: int = 1
    active: bool = True

    def line(self) -> str:
        return (f"health warning ({self.check}) at {self.first_env_steps:,} env steps: {self.symptom}. "
                f"Usual cause: {self.cause}. (limit: {self.limit_key})")


@dataclass
class _State:
    bad_run: int = 0
    good_run: int = 0
    warning: HealthWarning | None = None  # the current or last warning of this check


class HealthMonitor:
    """Feed it each progress record with `observe`; it returns the warnings that start there."""

    def __init__(self, facts: RunFacts, limits, checks=CHECKS):
        self.enabled, self.limits = limits.enabled, limits
        self.checks = [cls(facts, limits) for cls in checks] if self.enabled else []
        self.state = {check.name: _State() for check in self.checks}
        self.measures: dict[str, float] = {}
        self.history: list[HealthWarning] = []
        self.diverged_at: dict | None = None

    def observe(self, env_steps: int, values: Mapping[str, float]) -> list[HealthWarning]:
        started = []
        self.measures = {}
        for check in self.checks:
            reading = check.read(env_steps, values)
            if reading is None:
                continue
            self.measures[check.name] = reading.measure
            state = self.state[check.name]
            if reading.bad:
                state.bad_run, state.good_run = state.bad_run + 1, 0
                if state.warning is not None and state.warning.active:
                    state.warning.last_env_steps, state.warning.symptom = env_steps, reading.symptom
                    state.warning.readings += 1
                elif state.bad_run >= check.confirm or reading.confirmed:
                    state.warning = HealthWarning(check.name, reading.symptom, reading.cause or check.cause,
                                                  check.limit_key, env_steps, env_steps)
                    self.history.append(state.warning)
                    started.append(state.warning)
            else:
                state.bad_run, state.good_run = 0, state.good_run + 1
                if state.warning is not None and state.warning.active and state.good_run >= CLEAR_AFTER:
                    state.warning.active = False
        return started

    def collapse_limit(self, best: float) -> float:
        """The return below which a final evaluation counts as collapsed from the best one, `best`:
        ReturnCollapsed's limit, with the gain over the random phase (none if it saw none)."""
        check = next((c for c in self.checks if isinstance(c, ReturnCollapsed)), None)
        baseline = check.baseline if check is not None else None
        gain = max(best - baseline, 0.0) if baseline is not None else 0.0
        return collapse_limit(best, gain, self.limits.collapse_fraction)

    def active(self) -> list[str]:
        return [w.check for w in self.history if w.active]

    def values(self) -> dict[str, float]:
        """health/<check> = the measure of each check that read the last record, and health/warnings =
        how many warnings are active."""
        if not self.enabled:
            return {}
        return {**{f"health/{name}": value for name, value in self.measures.items()},
                "health/warnings": float(len(self.active()))}

    def diverged(self, update: int, what: str, env_steps: int) -> None:
        self.diverged_at = {"update": update, "env_steps": env_steps, "what": what}

    def summary(self) -> dict:
        status = "diverged" if self.diverged_at else "warnings" if self.history else "ok"
        return {"status": status, "enabled": self.enabled, "diverged": self.diverged_at,
                "warnings": [{"check": w.check, "first_env_steps": w.first_env_steps,
                              "last_env_steps": w.last_env_steps, "readings": w.readings,
                              "active_at_end": w.active, "symptom": w.symptom, "cause": w.cause,
                              "limit_key": w.limit_key} for w in self.history],
                "checks": [check.name for check in self.checks]}
