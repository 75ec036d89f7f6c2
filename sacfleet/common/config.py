"""Typed run configuration: nested dataclasses, YAML presets, `--set a.b=value` overrides.

Every key is declared here with its type and allowed values, so a typo or a bad value fails at
load time with a message that names the key, never hours into a run.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"
SHARD_ACTORS = 4  # env actors per replay shard with replay.num_shards=auto


class ConfigError(ValueError):
    """A config key is unknown or its value is not allowed; the message names the key."""


def _key(default: Any = dataclasses.MISSING, *, factory: Any = None, choices: tuple | None = None,
         ge: float | None = None, gt: float | None = None, le: float | None = None, auto: bool = False,
         doc: str = "") -> Any:
    """`auto`: the key also takes the value "auto" (stored as None until the config is resolved)."""
    meta = {"choices": choices, "ge": ge, "gt": gt, "le": le, "auto": auto, "doc": doc}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class EnvConfig:
    id: str = _key("sacfleet/PointMass-v0", doc="gymnasium id, e.g. HalfCheetah-v5")
    kwargs: dict = _key(factory=dict, doc="keyword arguments for gymnasium.make")


@dataclass
class ActorsConfig:
    num: int = _key(2, ge=1, doc="number of env actors")
    envs_per_actor: int = _key(1, ge=1, doc="vector envs stepped together by one actor")
    weight_sync_interval: int = _key(10, ge=1, doc="actor steps between pulls of new weights")
    chunk_length: int = _key(10, ge=1, doc="vector steps per chunk pushed to replay (chunk_length x envs_per_actor transitions)")
    max_in_flight: int = _key(2, ge=1, doc="chunks an actor may have unacknowledged; a slow shard then holds the actor back")
    num_cpus: float | None = _key(None, gt=0, doc="Ray CPUs reserved per env actor; null shares what the learner and shards leave")
    max_restarts: int = _key(3, ge=0, doc="restarts allowed per env actor before the run stops with its error")
    max_num: int | None = _key(None, ge=1, doc="most env actors `sacfleet scale` may give a live run: CPU shares "
                                               "are planned for this many; null: actors.num")


@dataclass
class ReplayConfig:
    capacity: int = _key(1_000_000, ge=1, doc="transitions held in all shards together")
    num_shards: int | None = _key(None, ge=1, auto=True,
                                  doc="replay shards; auto (or null): one per SHARD_ACTORS=4 env actors, as one shard "
                                      "takes the inserts of about 4 one-env actors before they queue on it")
    sampler: str = _key("uniform", choices=("uniform", "prioritized"))
    samples_per_insert: float = _key(256.0, gt=0,
                                     doc="sampled transitions per inserted one (updates per env step x batch_size)")
    error_buffer: float | None = _key(None, gt=0,
                                      doc="allowed drift of the replay ratio, in samples; null sizes it from the request sizes")
    priority_alpha: float = _key(0.6, ge=0, le=1)
    priority_beta: float = _key(0.4, ge=0, le=1)
    priority_eps: float = _key(1e-6, gt=0)
    max_memory_fraction: float = _key(0.8, gt=0, le=1,
                                      doc="refuse a capacity whose arrays need more than this share of available memory")
    rate_limit_timeout_s: float = _key(300.0, gt=0,
                                       doc="longest an insert or sample may wait on the rate limiter before the run fails naming what is starved")
    num_cpus: float = _key(0.1, gt=0, doc="Ray CPUs reserved per shard")
    her: str = _key("off", choices=("off", "future", "final", "episode"),
                    doc="hindsight experience replay for goal envs: relabel sampled transitions with goals "
                        "achieved later in (future), at the end of (final) or anywhere in (episode) their episode")
    her_k: int = _key(4, ge=1, doc="relabeled goals per real one: a sampled transition is relabeled with "
                                   "probability her_k / (her_k + 1)")
    n_step: int = _key(1, ge=1, doc="n-step returns: each sampled transition sums the rewards of up to n steps of "
                                    "its episode, discounted, and the learner bootstraps from the state reached with "
                                    "gamma^k for the k steps summed (fewer at an episode's end, where a time-limit "
                                    "truncation still bootstraps and a termination does not)")


@dataclass
class LearnerConfig:
    device: str = _key("auto", choices=("auto", "cpu", "cuda"))
    batch_size: int = _key(256, ge=1)
    hidden_sizes: list[int] = _key(factory=lambda: [256, 256], ge=1, doc="widths of the hidden layers")
    actor_lr: float = _key(3e-4, gt=0)
    critic_lr: float = _key(3e-4, gt=0)
    alpha_lr: float = _key(3e-4, gt=0)
    gamma: float = _key(0.99, ge=0, le=1)
    tau: float = _key(0.005, gt=0, le=1)
    init_alpha: float = _key(1.0, gt=0, doc="initial entropy temperature")
    learn_alpha: bool = _key(True)
    target_entropy: float | None = _key(None, doc="entropy target of the normalized action (in [-1, 1]^|A|, whatever the env's bounds); null means -|A|")
    reward_scale: float = _key(1.0, gt=0, doc="rewards are multiplied by this in the critic target")
    obs_norm: bool = _key(False, doc="networks see observations standardized by the running mean and variance of "
                                     "those the learner trains on (published with the weights, checkpointed)")
    obs_clip: float | None = _key(None, gt=0, doc="networks see observations (standardized ones with obs_norm) clipped "
                                                  "to [-obs_clip, obs_clip]; null: unclipped")
    obs_symlog: bool = _key(False, doc="networks see symlog(x) of each input x (after obs_norm and obs_clip): inputs "
                                       "far from the data grow logarithmically, so a symlog_q critic extrapolates Q "
                                       "polynomially there, not exponentially")
    critic_warmup: int = _key(0, ge=0, doc="first learner updates that train only the critics; the policy is "
                                           "published after them, so env actors act at random until then")
    critic: str = _key("mlp", choices=("mlp", "layernorm", "crossq"),
                       doc="mlp: SAC's critics with Polyak-averaged target critics; layernorm: the same with "
                           "LayerNorm after each hidden layer (as BRO); crossq: CrossQ (Bhatt et al., 2024), batch "
                           "renormalization in actor and critics, no target critics, (s, a) and (s', a') in one "
                           "forward pass")
    critic_hidden_sizes: list[int] | None = _key(None, ge=1, auto=True,
                                                 doc="widths of the critics' hidden layers; auto: hidden_sizes, "
                                                     "with crossq CrossQ's published [2048, 2048]")
    policy_delay: int | None = _key(None, ge=1, auto=True,
                                    doc="updates per policy (and temperature) update; auto: 1, with crossq 3 "
                                        "(CrossQ's)")
    adam_beta1: float | None = _key(None, ge=0, le=1, auto=True,
                                    doc="Adam's beta1 for every optimizer; auto: 0.9, with crossq 0.5 (CrossQ's)")
    batch_renorm_momentum: float = _key(0.99, gt=0, le=1, doc="crossq: decay of batch renormalization's running "
                                                              "statistics")
    batch_renorm_warmup: int = _key(100_000, ge=0, doc="crossq: training steps of each batch renormalization "
                                                        "layer that normalize by batch statistics alone, before "
                                                        "renormalizing towards the running ones (CrossQ's 100k)")
    compile: str = _key("auto", choices=("auto", "on", "off"),
                        doc="torch.compile the losses and capture the update in a CUDA graph; auto: on with CUDA only")
    matmul_precision: str = _key("float32", choices=("float32", "tf32"),
                                 doc="internal precision of the learner's float32 matmuls on CUDA: float32 "
                                     "(IEEE), or tf32 (Ampere and later GPUs: 10-bit mantissas, faster); "
                                     "no effect on CPU")
    symlog_q: bool = _key(False, doc="critics predict symlog(Q), so errors are relative to |Q|")
    publish_interval: int = _key(10, ge=1, doc="updates between weight publishes (each encodes the policy once); "
                                               "the fleet learner publishes between blocks of prefetch_batches updates")
    num_threads: int = _key(0, ge=0, doc="torch CPU threads for the learner; 0 means its Ray CPUs (inline: torch's default)")
    num_cpus: float = _key(1.0, gt=0, doc="Ray CPUs reserved for the learner (capped at half the cluster's)")
    prefetch_batches: int = _key(8, ge=1, doc="batches per sample request, updated as one block (one CUDA graph "
                                              "on GPUs); one request per shard is kept in flight")


@dataclass
class TrainConfig:
    seed: int = _key(0, ge=0)
    total_env_steps: int = _key(100_000, ge=1)
    learning_starts: int = _key(1_000, ge=0, doc="uniform random actions, and no updates, before this many env steps")
    max_wall_seconds: float | None = _key(None, gt=0)
    log_interval: int = _key(2_000, ge=1, doc="env steps between progress lines and metric records")
    max_failures: int = _key(3, ge=0, doc="replay shard, learner and eval actor failures (a crash, a killed "
                             "process, a lost node: processes found dead one after another count once) the fleet "
                             "recovers from in place before the run stops with the cause; env actors have "
                             "actors.max_restarts")
    hang_timeout_s: float = _key(30.0, ge=5, doc="seconds a fleet process may leave a status call unanswered (or an "
                                 "env actor go without stepping while not held back) before it counts as hung: it "
                                 "is killed and recovered like a dead one. The learner and actors answer status calls "
                                 "on a thread of their own and a shard between calls of milliseconds, so long work "
                                 "(a snapshot, a first compile) does not delay them; a checkpoint call unanswered this "
                                 "long counts only when a status call then goes unanswered too")


@dataclass
class EvalConfig:
    episodes: int = _key(10, ge=1, doc="deterministic episodes per periodic evaluation")
    interval: int = _key(10_000, ge=0, doc="env steps between evaluations; 0 disables periodic ones")
    final_episodes: int = _key(20, ge=1, doc="episodes of the final evaluation reported in summary.json")
    seed: int = _key(1_000_000, ge=0, doc="base seed of evaluation episodes, apart from training seeds")


@dataclass
class CheckpointConfig:
    interval: int = _key(0, ge=0, doc="learner updates between checkpoints; 0: none on this schedule")
    interval_s: float = _key(60.0, ge=0, doc="seconds of wall time between checkpoints; 0: none on this schedule. "
                             "A failure loses at most this much work")
    replay: bool = _key(True, doc="also snapshot the replay contents with each checkpoint (incrementally: only "
                        "what changed since the last)")
    best: bool = _key(True, doc="keep the best-evaluated policy as checkpoints/best.pt (sacfleet eval --best); "
                      "a policy only, not a point to resume from")
    keep: int = _key(2, ge=1, doc="checkpoint sets kept (checkpoint.pt, checkpoint.1.pt, ...): a resume or a "
                     "recovery uses the newest that reads back whole")
    max_write_failures: int = _key(3, ge=1, doc="checkpoint sets in a row that may fail to be written (a full "
                                   "disk) before the run stops; each is reported and retried at the next checkpoint")


@dataclass
class HealthConfig:
    """Limits of the training-health checks (README, "Training health"); each warning names the key
    that sets its limit, so a check that misfires for a task can be loosened."""

    enabled: bool = _key(True, doc="run the health checks and report what they see")
    q_bound_factor: float = _key(3.0, gt=0, doc="warn when |mean Q| exceeds this multiple of the largest value the "
                                               "rewards, reward_scale, temperature and gamma allow")
    critic_disagreement: float = _key(10.0, gt=1, doc="warn when one critic's mean |Q| is this many times the other's")
    min_ent_coef: float = _key(0.01, gt=0, doc="warn when the learned temperature falls below this (and below a "
                                             "hundredth of learner.init_alpha) early in training, before the "
                                             "return improved")
    early_steps: int = _key(10_000, ge=0, doc="env steps after train.learning_starts that count as early in training")
    entropy_margin: float = _key(3.0, gt=0, doc="warn when the policy entropy is this many nats per action dimension "
                                              "below learner.target_entropy")
    stall_fraction: float = _key(0.5, gt=0, le=1, doc="warn when the return (or a success rate below 0.5) gains nothing "
                                                     "over this share of the run's steps after learning starts")
    collapse_fraction: float = _key(0.5, gt=0, doc="warn when the evaluation or training return falls below the best "
                                                   "the run reached by more than this fraction of the larger of |best| "
                                                   "and its gain over the random phase's return")
    ratio_tolerance: float = _key(0.2, gt=0, doc="warn when the measured samples per insert is off its target by "
                                               "more than this fraction")
    lag_factor: float = _key(4.0, gt=1, doc="warn when the policy lag exceeds this multiple of what the fleet's "
                                          "settings imply (fleet runs)")
    starved_seconds: float = _key(60.0, gt=0, doc="warn when actors are held back, or the learner waits for batches, "
                                                "this long without a break (fleet runs)")


@dataclass
class Config:
    env: EnvConfig = field(default_factory=EnvConfig)
    actors: ActorsConfig = field(default_factory=ActorsConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    health: HealthConfig = field(default_factory=HealthConfig)


# --------------------------------------------------------------------------------------- keys

def _sections() -> dict[str, type]:
    return {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}


def all_keys() -> list[str]:
    """Every valid dotted key, e.g. 'learner.batch_size'."""
    return [f"{name}.{f.name}" for name, cls in _sections().items() for f in dataclasses.fields(cls)]


def _unknown(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    if not close:  # a bare field name typed without its section still deserves a hint
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in all_keys() if k.endswith("." + leaf)][:1]
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid sections: {', '.join(_sections())}"
    return ConfigError(f"unknown config key '{key}'{hint}")


# ----------------------------------------------------------------------------------- coercion

def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert `value` (from YAML or a --set string) to type `tp`, or raise naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none", "~")):
            return None
        return _coerce(key, value, args[0])
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "yes", "on", "1"):
            return True
        if text in ("false", "no", "off", "0"):
            return False
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            number = float(str(value).replace("_", ""))
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if not number.is_integer():
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(number)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            number = float(str(value).replace("_", "")) if isinstance(value, str) else float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, bool):  # YAML 1.1 reads a bare on/off as a boolean
            return "on" if value else "off"
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            parsed = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
            value = parsed
        if not isinstance(value, (list, tuple)) or not value:
            raise ConfigError(f"{key}: expected a non-empty list, e.g. [256, 256], got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    raise TypeError(f"no coercion for {key}: {tp}")  # a bug in this module, not user input


def _check(key: str, value: Any, meta: typing.Mapping) -> None:
    if value is None:
        return
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of: {', '.join(meta['choices'])}")
    numbers = value if isinstance(value, list) else [value]
    for v in numbers:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if meta.get("ge") is not None and v < meta["ge"]:
            raise ConfigError(f"{key}: {v!r} is too small; it must be >= {meta['ge']}")
        if meta.get("gt") is not None and v <= meta["gt"]:
            raise ConfigError(f"{key}: {v!r} is too small; it must be > {meta['gt']}")
        if meta.get("le") is not None and v > meta["le"]:
            raise ConfigError(f"{key}: {v!r} is too large; it must be <= {meta['le']}")


# ------------------------------------------------------------------------------ build / dump

def from_dict(data: dict | None) -> Config:
    """Build a validated Config from nested mappings; missing keys take their defaults."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(data).__name__}")
    sections = _sections()
    built = {}
    for name, body in data.items():
        if name not in sections:
            raise _unknown(str(name))
        if body is not None and not isinstance(body, dict):
            raise ConfigError(f"{name}: expected a mapping of keys, got {body!r}")
    for name, cls in sections.items():
        body = data.get(name) or {}
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for k, v in body.items():
            key = f"{name}.{k}"
            if k not in fields:
                raise _unknown(key)
            auto = fields[k].metadata.get("auto")
            if auto and isinstance(v, str) and v.strip().lower() == "auto":
                v = None
            try:
                values[k] = _coerce(key, v, hints[k])
            except ConfigError as exc:
                raise ConfigError(f"{exc}; or auto") if auto else exc from None
            _check(key, values[k], fields[k].metadata)
        built[name] = cls(**values)
    config = Config(**built)
    _check_consistency(config)
    return config


def auto_shards(num_actors: int) -> int:
    """replay.num_shards=auto: one shard per SHARD_ACTORS env actors. Measured on 16 cores (HalfCheetah,
    one env per actor): one shard took 4 actors' inserts with collection still growing with the actor
    count, and held 8 back (60% of their time waiting on it)."""
    return max(1, math.ceil(num_actors / SHARD_ACTORS))


# What learner.critic=crossq sets its auto keys to: CrossQ's published settings (Bhatt et al., 2024).
CROSSQ_DEFAULTS = {"critic_hidden_sizes": [2048, 2048], "policy_delay": 3, "adam_beta1": 0.5}


def _resolve_learner(learner: "LearnerConfig") -> None:
    crossq = learner.critic == "crossq"
    if learner.critic_hidden_sizes is None:
        learner.critic_hidden_sizes = list(CROSSQ_DEFAULTS["critic_hidden_sizes"]) if crossq else list(learner.hidden_sizes)
    if learner.policy_delay is None:
        learner.policy_delay = CROSSQ_DEFAULTS["policy_delay"] if crossq else 1
    if learner.adam_beta1 is None:
        learner.adam_beta1 = CROSSQ_DEFAULTS["adam_beta1"] if crossq else 0.9


def _check_consistency(config: Config) -> None:
    if config.replay.num_shards is None:
        config.replay.num_shards = auto_shards(config.actors.num)
    _resolve_learner(config.learner)
    if config.replay.capacity < config.learner.batch_size:
        raise ConfigError(
            f"replay.capacity: {config.replay.capacity} is smaller than learner.batch_size "
            f"({config.learner.batch_size}); the buffer could never fill one batch")
    if config.replay.her != "off" and config.replay.sampler == "prioritized":
        raise ConfigError("replay.her: relabeling cannot be combined with replay.sampler=prioritized (a stored "
                          "transition's TD error depends on the goal each sample draws for it); choose "
                          "replay.sampler=uniform or replay.her=off")
    if config.learner.critic == "crossq" and config.learner.symlog_q:
        raise ConfigError("learner.critic: crossq cannot be combined with learner.symlog_q=true: symlog(Q) "
                          "regressed on its own bootstrapped targets barely contracts where |Q| is large (the "
                          "backup's slope in symlog space tends to 1, not gamma), and CrossQ has no target critics "
                          "to slow the critics chasing themselves; its Q values ran away within 3k steps on the "
                          "point mass. Set learner.symlog_q=false or choose learner.critic=mlp or layernorm")
    if config.replay.her != "off" and config.replay.n_step > 1:
        raise ConfigError(f"replay.n_step: {config.replay.n_step} cannot be combined with replay.her (relabeling "
                          f"gives a sampled transition a new goal, and every reward of its n-step sum would have to "
                          f"be recomputed for it, which sacfleet does not do); set replay.n_step=1 or replay.her=off")
    if config.replay.her != "off" and config.replay.num_shards > config.actors.num:
        raise ConfigError(f"replay.num_shards: {config.replay.num_shards} shards with replay.her on need at least "
                          f"as many env actors (actors.num={config.actors.num}): each actor's episodes go to one "
                          f"shard, so that relabeled goals stay within their episode")
    if config.replay.capacity < config.replay.num_shards:
        raise ConfigError(f"replay.capacity: {config.replay.capacity} is less than one slot per shard "
                          f"(replay.num_shards={config.replay.num_shards})")


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def set_key(data: dict, assignment: str) -> None:
    """Apply one `a.b=value` override to nested mappings in place (validated later by from_dict)."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like section.key=value")
    key, _, text = assignment.partition("=")
    key = key.strip()
    parts = key.split(".")
    sections = _sections()
    if len(parts) < 2 or parts[0] not in sections:
        raise _unknown(key)
    section_fields = {f.name for f in dataclasses.fields(sections[parts[0]])}
    if parts[1] not in section_fields:
        raise _unknown(key)
    if len(parts) > 2 and typing.get_type_hints(sections[parts[0]])[parts[1]] is not dict:
        raise _unknown(key)
    value = yaml.safe_load(text) if text.strip() else ""
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def variant_names() -> list[str]:
    """Override sets a preset can be loaded with, as `<preset>+<variant>` (configs/variants/*.yaml)."""
    return sorted(p.stem for p in (PRESET_DIR / "variants").glob("*.yaml"))


def _read_yaml(source: Path) -> dict:
    try:
        data = yaml.safe_load(source.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a config must be a mapping of sections")
    return data


def resolve_source(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if preset.is_file():
        return preset
    raise ConfigError(f"config {name_or_path!r} is neither a preset ({', '.join(preset_names())}) "
                      f"nor a YAML file")


def load_config(name_or_path: str | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Load a preset name or YAML path (or the defaults), each `+variant` after it laid over it in turn
    (e.g. hopper+fast), then the overrides; validate."""
    data: dict = {}
    if name_or_path:
        base, *variants = [name_or_path] if Path(name_or_path).is_file() else name_or_path.split("+")
        data = _read_yaml(resolve_source(base))
        for variant in variants:
            source = PRESET_DIR / "variants" / f"{variant}.yaml"
            if not source.is_file():
                raise ConfigError(f"config {name_or_path!r}: {variant!r} is not a variant; choose from: "
                                  f"{', '.join(variant_names())}")
            for section, body in _read_yaml(source).items():
                if isinstance(body, dict) and isinstance(data.get(section), dict):
                    data[section] = {**data[section], **body}
                else:
                    data[section] = body
    for assignment in overrides:
        set_key(data, assignment)
    return from_dict(data)


def save_config(config: Config, path: Path) -> None:
    from sacfleet.common.io import atomic_write_bytes

    atomic_write_bytes(Path(path), yaml.safe_dump(to_dict(config), sort_keys=False).encode())
