"""Tests for fdjax.config: defaults, TOML round trip, overrides and every kind of error."""

from __future__ import annotations

import dataclasses
import tomllib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fdjax.config import (ClientsConfig, Config, ConfigError, StopConfig, config_to_toml,
                          load_config, parse_override, with_overrides)


def roundtrip(cfg: Config) -> Config:
    return Config.from_dict(tomllib.loads(config_to_toml(cfg)))


def test_defaults_validate():
    cfg = Config()
    assert cfg == Config.from_dict({}) == load_config()
    assert cfg.method == "async-continuous" and cfg.clock == "virtual" and cfg.seed == 0
    assert cfg.clients.speeds == [0.25] and cfg.client_speeds == [0.25, 0.25, 0.25]
    assert cfg.stop.time_budget == 60.0 and cfg.stop.eval_interval == 0.5 and cfg.data.limit is None
    assert cfg.cost.mode == "fixed"  # the default comparison is the same on every machine
    assert "limit" not in cfg.to_dict()["data"]


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().seed = 1  # type: ignore[misc]


def test_toml_roundtrip_defaults_and_changed():
    assert roundtrip(Config()) == Config()
    cfg = load_config(overrides=[
        "method=sync", "clock=real", "seed=7", "clients.count=2", "clients.speeds=[1, 2.5]",
        'data.source="folder"', 'data.root="C:\\\\img \\"x\\"\\n\\u007f é"', "data.limit=500",
        "stop.time_budget=none", "stop.max_rounds=4", "stop.target_accuracy=0.9",
        "distill.learning_rate=1e-5", "cost.bandwidth=inf", "data.download=true"])
    assert cfg.data.root == 'C:\\img "x"\n\x7f é' and cfg.stop.time_budget is None
    assert roundtrip(cfg) == cfg
    assert cfg.client_speeds == [1.0, 2.5]


@settings(max_examples=60, deadline=None)
@given(lr=st.floats(min_value=1e-12, max_value=1e6, allow_nan=False),
       temperature=st.floats(min_value=1e-9, allow_nan=False, allow_infinity=False),
       latency=st.floats(min_value=0.0, max_value=1e9),
       seed=st.integers(min_value=0, max_value=2**62),
       speeds=st.lists(st.floats(min_value=1e-6, max_value=1e6), min_size=1, max_size=1)
       | st.lists(st.integers(min_value=1, max_value=100), min_size=4, max_size=4),
       budget=st.none() | st.floats(min_value=1e-3, max_value=1e9))
def test_toml_roundtrip_property(lr, temperature, latency, seed, speeds, budget):
    cfg = Config.from_dict({
        "seed": seed,
        "clients": {"count": 4, "speeds": speeds, "learning_rate": lr},
        "distill": {"temperature": temperature},
        "cost": {"latency": latency},
        "stop": {"time_budget": budget, "max_rounds": 3}})
    assert roundtrip(cfg) == cfg
    assert all(isinstance(s, float) for s in cfg.clients.speeds)


@pytest.mark.parametrize("text, expected", [
    ("clients.count=5", ("clients.count", 5)),
    ("clients.learning_rate=0.1", ("clients.learning_rate", 0.1)),
    ("data.download=true", ("data.download", True)),
    ('data.name="mnist"', ("data.name", "mnist")),
    ("clients.speeds=[1.0, 2.0]", ("clients.speeds", [1.0, 2.0])),
    ("method=sync", ("method", "sync")),
    ("method = sync-fwd ", ("method", "sync-fwd")),
    ("data.root=/a/b=c", ("data.root", "/a/b=c")),
    ("data.limit=none", ("data.limit", None)),
    ("stop.time_budget=NULL", ("stop.time_budget", None)),
])
def test_parse_override(text, expected):
    assert parse_override(text) == expected


@pytest.mark.parametrize("text", ["clients.count", "=5", ""])
def test_parse_override_needs_key_and_equals(text):
    with pytest.raises(ConfigError, match="key=value"):
        parse_override(text)


def test_overrides_of_each_type():
    cfg = with_overrides(Config(), [
        "clients.count=5", "clients.learning_rate=1", "data.keep_proxy_labels=true",
        "models.norm=group", "clients.speeds=[1, 2, 3, 4, 5]", "seed=3",
        "data.limit=1000", "stop.max_rounds=7"])
    assert cfg.clients.count == 5 and cfg.seed == 3
    assert cfg.clients.learning_rate == 1.0 and isinstance(cfg.clients.learning_rate, float)
    assert cfg.data.keep_proxy_labels is True and cfg.models.norm == "group"
    assert cfg.client_speeds == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert with_overrides(cfg, ["data.limit=none"]).data.limit is None
    # Overrides apply in order; only the final state is validated.
    assert with_overrides(cfg, ["clients.count=1", "clients.count=2",
                                "clients.speeds=[1,1]"]).clients.count == 2


@pytest.mark.parametrize("d, key", [
    ({"bogus": {}}, "bogus"),
    ({"clients": {"cuont": 3}}, "clients.cuont"),
    ({"methd": "sync"}, "methd"),
    ({"clients": 3}, "clients"),
])
def test_unknown_or_malformed(d, key):
    with pytest.raises(ConfigError, match=f"'?{key}'?"):
        Config.from_dict(d)
    with pytest.raises(ConfigError) as info:
        Config.from_dict(d)
    assert key in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("override, key, words", [
    ("models.global_width=abc", "models.global_width", "expected float, got 'abc'"),
    ("clients.count=2.0", "clients.count", "expected int"),
    ("clients.count=true", "clients.count", "expected int, got True"),
    ("clients.learning_rate=false", "clients.learning_rate", "expected float"),
    ("data.limit=true", "data.limit", "expected int"),
    ("clients.speeds=[1, true]", "clients.speeds", "expected float"),
    ("clients.speeds=2", "clients.speeds", "expected list"),
    ("data.download=1", "data.download", "expected bool"),
    ("method=none", "method", "expected str"),
    ("data.name=5", "data.name", "expected str"),
    ("clients.count=0", "clients.count", "must be >= 1, got 0"),
    ("seed=-1", "seed", "must be >= 0"),
    ("data.alpha=0", "data.alpha", "must be > 0"),
    ("distill.label_weight=1.5", "distill.label_weight", "must be in [0, 1]"),
    ("distill.mix_alpha=-0.1", "distill.mix_alpha", "must be in [0, 1]"),
    ("stop.target_accuracy=0", "stop.target_accuracy", "must be in (0, 1]"),
    ("stop.max_rounds=0", "stop.max_rounds", "must be >= 1"),
    ("clients.speeds=[1.0, -1.0, 1.0]", "clients.speeds", "must be > 0"),
    ("cost.latency=-1", "cost.latency", "must be >= 0"),
    ("cost.bandwidth=nan", "cost.bandwidth", "must be a finite number, got nan"),
    ("cost.bandwidth=-inf", "cost.bandwidth", "must be a finite number"),
    ("clients.learning_rate=inf", "clients.learning_rate", "must be a finite number, got inf"),
    ("distill.temperature=nan", "distill.temperature", "must be a finite number"),
    ("clients.speeds=[1.0, inf, 1.0]", "clients.speeds", "must be a finite number"),
    ("cost.latency=inf", "cost.latency", "must be a finite number"),
    ("stop.time_budget=inf", "stop.time_budget", "must be a finite number"),
    ("aggregation.clip_norm=inf", "aggregation.clip_norm", "must be a finite number"),
    ("aggregation.clip_norm=0", "aggregation.clip_norm", "must be > 0"),
    ("distill.staleness_a=0", "distill.staleness_a", "must be > 0"),
    ("distill.staleness_b=-1", "distill.staleness_b", "must be >= 0"),
    ("distill.staleness_a=nan", "distill.staleness_a", "must be a finite number"),
    ("aggregation.rule=krum", "aggregation.num_byzantine", "more than 2f + 2"),
    ("aggregation.num_byzantine=-1", "aggregation.num_byzantine", "must be >= 0"),
    ("aggregation.multi_krum_keep=4", "aggregation.multi_krum_keep", "at most the clients"),
    ("data.partition=hsu", "data.partition", "must be one of"),
    ("method=fedprox", "method", "must be one of"),
    ("clock=wall", "clock", "must be one of"),
    ("models.global_preset=cnn3", "models.global_preset", "must be one of"),
    ("clients.optimizer=lion", "clients.optimizer", "must be one of"),
    ("stop.time_budget=none", "stop.time_budget", "at least one of"),
    ("clients.speeds=[1.0, 2.0]", "clients.speeds", "clients.count"),
    ("data.source=folder", "data.root", "required"),
    ("data.limit=300", "data.proxy_size", "data.limit"),
    ("clients.devices=4", "clients.devices", "at most clients.count (3)"),
    ("clients.cohort=true", "clients.cohort", "set clients.devices"),
    ("clients.sample_count=5", "clients.sample_count", "at most clients.count (3)"),
    ("clients.sample_fraction=0", "clients.sample_fraction", "must be in (0, 1]"),
    ("clients.cohort_size=0", "clients.cohort_size", "must be >= 1"),
    ("clients=5", "clients", "section"),
    ("clients.a.b=1", "clients.a.b", "unknown key"),
    ("nosuch.key=1", "nosuch.key", "unknown key"),
])
def test_errors_name_the_dotted_key(override, key, words):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    message = str(info.value)
    assert key in message and words in message and "\n" not in message


def test_contradictions_resolved_are_fine():
    cfg = load_config(overrides=["stop.time_budget=none", "stop.max_rounds=10",
                                 "data.source=folder", "data.root=imgs",
                                 "data.limit=301", "clients.count=1"])
    assert cfg.stop.time_budget is None and cfg.data.root == "imgs"


def test_shared_client_devices_take_one_speed_per_device():
    cfg = load_config(overrides=["clients.count=5", "clients.devices=2",
                                 "clients.speeds=[1.0, 0.5]", "clients.sample_fraction=0.5"])
    assert cfg.device_speeds == [1.0, 0.5]
    assert cfg.client_speeds == [1.0, 0.5, 1.0, 0.5, 1.0]  # client i on device i mod 2
    assert cfg.clients.per_round == 2  # round(0.5 * 5)
    with pytest.raises(ConfigError, match="clients.speeds: must have 1 or clients.devices"):
        load_config(overrides=["clients.count=5", "clients.devices=2",
                               "clients.speeds=[1.0, 0.5, 0.5, 0.5, 0.5]"])


def test_direct_construction_validates():
    with pytest.raises(ConfigError, match="clients.count"):
        ClientsConfig(count=0)
    with pytest.raises(ConfigError, match="stop:"):
        StopConfig(time_budget=None)
    with pytest.raises(ConfigError, match="seed"):
        Config().replace(seed=-2)
    assert Config().replace(seed=2).seed == 2


def test_load_file_with_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('method = "sync"\n[clients]\ncount = 4\nspeeds = [1, 2, 3, 4]\n'
                    '[stop]\ntime_budget = "none"\nmax_rounds = 5\n')
    cfg = load_config(path, ["clients.count=2", "clients.speeds=[0.5]"])
    assert cfg.method == "sync" and cfg.client_speeds == [0.5, 0.5]
    assert cfg.stop.time_budget is None and cfg.stop.max_rounds == 5
    assert load_config(str(path)) == roundtrip(load_config(path))
    written = tmp_path / "out.toml"
    written.write_text(config_to_toml(cfg))
    assert load_config(written) == cfg


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file 'x.toml' not found"):
        load_config("x.toml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.toml")


def test_bad_toml(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[clients\ncount = 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "invalid TOML" in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_values_in_file_name_the_key(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[clients]\ncount = true\n")
    with pytest.raises(ConfigError, match="clients.count: expected int, got True"):
        load_config(path)
    # An override applied after the file can fix a bad file value.
    assert load_config(path, ["clients.count=3"]).clients.count == 3


@pytest.mark.parametrize("text, key", [
    ("[clients]\nlearning_rate = inf\n", "clients.learning_rate"),
    ("[distill]\ntemperature = nan\n", "distill.temperature"),
    ("[clients]\ncount = 3\nspeeds = [0.5, -inf, 1.0]\n", "clients.speeds"),
    ("[cost]\nbandwidth = nan\n", "cost.bandwidth"),
])
def test_non_finite_numbers_in_a_file_name_the_key(tmp_path, text, key):
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{key}: must be a finite number")
    assert "\n" not in str(info.value)


def test_an_unlimited_bandwidth_is_the_one_infinity_allowed():
    assert load_config(overrides=["cost.bandwidth=inf"]).cost.bandwidth == float("inf")


def test_every_recorded_experiment_config_loads():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*/config*.toml"))
    assert configs
    for path in configs:
        load_config(path)


@pytest.mark.parametrize("overrides, key, words", [
    (["clients.sample_count=2", "aggregation.quorum=3"], "aggregation.quorum",
     "clients sampled per round (2)"),
    (["clients.devices=1", "clients.cohort=true", "faults.clients=['crash:0@1']"],
     "faults.clients", "cohorts"),
])
def test_settings_that_contradict_each_other_name_a_key(overrides, key, words):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    message = str(info.value)
    assert key in message and words in message and "\n" not in message


def test_every_closed_list_of_names_the_config_accepts_is_the_implementation_s_own():
    """One source per list: each name the config accepts is one its implementation takes."""
    from fdjax.config import ClientsConfig, CostConfig, DataConfig, DistillConfig, ModelsConfig
    from fdjax.core.augment import AUGMENTATIONS
    from fdjax.core.models import make_model
    from fdjax.core.training import OptimizerSettings, make_optimizer
    from fdjax.data.partition import SCHEMES
    from fdjax.methods import names

    for optimizer in ("adam", "adamw", "sgd", "momentum"):
        ClientsConfig(optimizer=optimizer)
        make_optimizer(OptimizerSettings(optimizer, 1e-3))
    for preset in ("cnn6", "cnn12"):
        ModelsConfig(global_preset=preset)
        make_model(preset, input_shape=(8, 8, 1))
    for scheme in SCHEMES:
        DataConfig(partition=scheme)
    for augment in AUGMENTATIONS:
        DistillConfig(augment=augment)
    for mode in ("measured", "calibrated", "fixed"):
        CostConfig(mode=mode)
    for rejected, section, key in [("rmsprop", ClientsConfig, "optimizer"),
                                   ("resnet", ModelsConfig, "global_preset"),
                                   ("zipf", DataConfig, "partition"),
                                   ("mixup", DistillConfig, "augment")]:
        with pytest.raises(ValueError, match=key):
            section(**{key: rejected})
    assert set(names()) >= {"sync-fwd", "sync", "async-round", "async-continuous", "fedbuff"}
