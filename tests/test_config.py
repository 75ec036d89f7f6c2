"""Config: presets, overrides with coercion, errors that name the key and the allowed values."""

import pytest
import yaml

from sacfleet.common.config import ConfigError, from_dict, load_config, preset_names, save_config, to_dict


def test_every_preset_loads():
    names = preset_names()
    assert {"pointmass", "pendulum", "halfcheetah", "hopper", "walker2d", "ant", "humanoid"} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert cfg.learner.batch_size > 0 and cfg.train.total_env_steps > 0


def test_overrides_are_coerced_to_the_declared_types():
    cfg = load_config("pointmass", ["learner.batch_size=512", "learner.actor_lr=1e-3", "train.total_env_steps=2e4",
                                    "learner.learn_alpha=false", "learner.hidden_sizes=[32, 16]",
                                    "learner.target_entropy=null", "replay.error_buffer=1_000",
                                    "env.kwargs.dims=3", "learner.hidden_sizes=8,8"])
    assert cfg.learner.batch_size == 512
    assert cfg.learner.actor_lr == 1e-3 and isinstance(cfg.learner.actor_lr, float)
    assert cfg.train.total_env_steps == 20000 and isinstance(cfg.train.total_env_steps, int)
    assert cfg.learner.learn_alpha is False
    assert cfg.learner.hidden_sizes == [8, 8]
    assert cfg.learner.target_entropy is None
    assert cfg.replay.error_buffer == 1000.0
    assert cfg.env.kwargs == {"dims": 3}


@pytest.mark.parametrize("override,message", [
    ("learner.batchsize=3", "unknown config key 'learner.batchsize'; did you mean 'learner.batch_size'?"),
    ("lerner.batch_size=3", "unknown config key 'lerner.batch_size'; did you mean 'learner.batch_size'?"),
    ("replay.capacty=10", "did you mean 'replay.capacity'?"),
    ("learner.device=gpu", "learner.device: 'gpu' is not allowed; choose one of: auto, cpu, cuda"),
    ("learner.matmul_precision=bf16", "learner.matmul_precision: 'bf16' is not allowed; choose one of: float32, tf32"),
    ("replay.sampler=per", "replay.sampler: 'per' is not allowed; choose one of: uniform, prioritized"),
    ("learner.batch_size=0", "learner.batch_size: 0 is too small; it must be >= 1"),
    ("learner.batch_size=12.5", "learner.batch_size: expected an integer, got 12.5"),
    ("learner.gamma=1.5", "learner.gamma: 1.5 is too large; it must be <= 1"),
    ("learner.actor_lr=fast", "learner.actor_lr: expected a number, got 'fast'"),
    ("learner.learn_alpha=maybe", "learner.learn_alpha: expected true or false"),
    ("learner.hidden_sizes=[]", "learner.hidden_sizes: expected a non-empty list"),
    ("learner.hidden_sizes=[64, 0]", "learner.hidden_sizes"),
    ("batch_size=3", "did you mean 'learner.batch_size'?"),
    ("learner.batch_size", "must look like section.key=value"),
    ("replay.capacity=10", "replay.capacity: 10 is smaller than learner.batch_size"),
])
def test_bad_overrides_name_the_key_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError) as info:
        load_config("pointmass", [override])
    assert message in str(info.value)


def test_unknown_section_and_preset_errors():
    with pytest.raises(ConfigError, match="unknown config key 'trainer'"):
        from_dict({"trainer": {}})
    with pytest.raises(ConfigError, match="neither a preset .*pointmass"):
        load_config("no-such-preset")


def test_hidden_sizes_must_be_positive():
    with pytest.raises(ConfigError, match=r"learner.hidden_sizes: 0 is too small"):
        from_dict({"learner": {"hidden_sizes": [64, 0]}})


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config("halfcheetah", ["learner.batch_size=1024"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(str(tmp_path / "config.yaml"))
    assert to_dict(again) == to_dict(cfg)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["learner"]["batch_size"] == 1024
