"""Tests for metarl.core.config: typed, validated YAML configs."""

from __future__ import annotations

import os
from typing import Any, Literal

import pytest
import yaml
from pydantic import model_validator

from metarl.core.config import ConfigError, ConfigModel, field_error, from_dict, join_key, option, to_dict
from metarl.core.config_files import apply_overrides, describe, dump_config, load_config


class Inner(ConfigModel):
    steps: int = option(1, doc="Inner-loop gradient steps.", ge=1)
    lr: float | list[float] = option(0.1, doc="Inner learning rate (or one per step).", gt=0)
    first_order: bool = option(False, doc="Use first-order gradients.")

    @model_validator(mode="after")
    def check_lr_per_step(self) -> Inner:
        if isinstance(self.lr, list) and len(self.lr) != self.steps:
            raise ValueError(f"lr has {len(self.lr)} entries but steps is {self.steps}")
        return self


class Outer(ConfigModel):
    lr: float = option(doc="Meta learning rate.", gt=0)
    optimizer: Literal["adam", "sgd"] = option("adam", doc="Meta optimizer.")
    lr_range: tuple[float, float] = option((1e-5, 1.0), doc="Allowed lr search range.")
    clip: float | None = option(None, doc="Gradient-norm clip (null = off).", gt=0)
    milestones: tuple[int, ...] = option((), doc="Epochs at which the lr decays.")

    @model_validator(mode="after")
    def check_lr_range(self) -> Outer:
        low, high = self.lr_range
        if low > high:
            raise field_error("", "lr_range", f"low must be <= high, got [{low}, {high}]")
        return self


class Config(ConfigModel):
    seed: int = option(0, doc="Random seed.")
    device: Literal["auto", "cpu", "cuda"] = option("auto", doc="Torch device.")
    algo: str = option("maml", doc="Algorithm name.", choices=["maml", "fomaml", "reptile"])
    tags: list[str] = option(default_factory=list, doc="Free-form run tags.")
    env_kwargs: dict[str, Any] = option(default_factory=dict, doc="Extra env kwargs.")
    inner: Inner = option(default_factory=Inner, doc="Inner-loop (adaptation) settings.")
    outer: Outer = option(default_factory=lambda: Outer(lr=1e-3), doc="Outer-loop settings.")


def err(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        from_dict(Config, data)
    return str(info.value)


# ---------------------------------------------------------------- building


def test_defaults_and_nested_build():
    cfg = from_dict(Config, {})
    assert cfg == Config()
    cfg = from_dict(
        Config,
        {
            "seed": 3,
            "device": "cpu",
            "inner": {"steps": 2, "lr": [0.1, 2]},
            "outer": {"lr": 1, "lr_range": [0, 1], "milestones": [10, 20]},
            "env_kwargs": {"a": [1, 2]},
        },
    )
    assert cfg.seed == 3 and cfg.device == "cpu"
    assert cfg.inner == Inner(steps=2, lr=[0.1, 2.0])
    assert isinstance(cfg.inner.lr[1], float)
    assert cfg.outer.lr == 1.0 and isinstance(cfg.outer.lr, float)
    assert cfg.outer.lr_range == (0.0, 1.0) and isinstance(cfg.outer.lr_range, tuple)
    assert cfg.outer.milestones == (10, 20)
    assert cfg.env_kwargs == {"a": [1, 2]}


def test_partial_section_is_overlaid_on_its_default_instance():
    cfg = from_dict(Config, {"outer": {"optimizer": "sgd"}})
    assert cfg.outer == Outer(lr=1e-3, optimizer="sgd")
    # ...but a section built on its own still requires its required keys
    with pytest.raises(ConfigError):
        from_dict(Outer, {"optimizer": "sgd"})


def test_exponent_string_is_accepted_as_float():
    # PyYAML reads 1e-3 (no dot) as a string; float fields accept it.
    assert from_dict(Config, {"outer": {"lr": "1e-3"}}).outer.lr == 1e-3


# ---------------------------------------------------------------- errors


def test_unknown_top_level_key_with_suggestion():
    assert err({"sed": 1}) == (
        "unknown key 'sed'; valid top-level keys: seed, device, algo, tags, env_kwargs, "
        "inner, outer (did you mean 'seed'?)"
    )


def test_unknown_top_level_key_belonging_to_a_section():
    assert err({"steps": 1}) == (
        "unknown key 'steps'; valid top-level keys: seed, device, algo, tags, env_kwargs, "
        "inner, outer (did you mean 'inner.steps'?)"
    )


def test_unknown_nested_key_with_suggestion():
    assert err({"outer": {"lrr": 0.1}}) == (
        "unknown key 'outer.lrr'; valid keys under 'outer': lr, optimizer, lr_range, "
        "clip, milestones (did you mean 'lr'?)"
    )


def test_unknown_key_without_suggestion():
    assert err({"zzz": 1}) == (
        "unknown key 'zzz'; valid top-level keys: seed, device, algo, tags, env_kwargs, inner, outer"
    )


def test_wrong_type():
    assert err({"outer": {"lr": "abc"}}) == "outer.lr: expected a float, got 'abc' (str)"
    assert err({"seed": "1"}) == "seed: expected an int, got '1' (str)"
    assert err({"inner": {"first_order": "yes please"}}) == (
        "inner.first_order: expected a bool (true/false), got 'yes please' (str)"
    )
    assert err({"inner": {"first_order": 1}}) == ("inner.first_order: expected a bool (true/false), got 1 (int)")
    assert err({"tags": "x"}) == "tags: expected a list of strings, got 'x' (str)"
    assert err({"tags": ["a", 3]}) == "tags[1]: expected a string, got 3 (int)"
    assert err({"env_kwargs": [1]}) == "env_kwargs: expected a mapping, got [1] (list)"


def test_bool_and_float_rejected_for_int_bool_rejected_for_float():
    assert err({"seed": True}) == "seed: expected an int, got True (bool)"
    assert err({"seed": 1.0}) == "seed: expected an int, got 1.0 (float)"
    assert err({"outer": {"lr": True}}) == "outer.lr: expected a float, got True (bool)"


def test_union_errors():
    assert err({"inner": {"lr": "fast"}}) == ("inner.lr: expected a float or a list of floats, got 'fast' (str)")
    # The list member matched in shape, so its element error is reported.
    assert err({"inner": {"lr": [0.1, "x"]}}) == "inner.lr[1]: expected a float, got 'x' (str)"
    assert err({"outer": {"clip": "big"}}) == "outer.clip: expected a float or null, got 'big' (str)"
    assert from_dict(Config, {"outer": {"clip": None}}).outer.clip is None
    assert from_dict(Config, {"outer": {"clip": 5}}).outer.clip == 5.0


def test_fixed_tuple_length():
    assert err({"outer": {"lr_range": [0.1]}}) == ("outer.lr_range: expected a list of 2 floats, got [0.1] (list)")


def test_out_of_range_scalar_and_in_list():
    assert err({"inner": {"steps": 0}}) == "inner.steps: must be >= 1, got 0"
    assert err({"outer": {"lr": 0}}) == "outer.lr: must be > 0, got 0.0"
    assert err({"inner": {"steps": 2, "lr": [0.1, -0.5]}}) == "inner.lr[1]: must be > 0, got -0.5"
    assert err({"outer": {"clip": -1}}) == "outer.clip: must be > 0, got -1.0"


def test_bad_literal_and_choices():
    assert err({"device": "gpu"}) == (
        "device: expected one of 'auto', 'cpu', 'cuda', got 'gpu' (str); did you mean 'cpu'?"
    )
    assert err({"outer": {"optimizer": "rmsprop"}}) == (
        "outer.optimizer: expected one of 'adam', 'sgd', got 'rmsprop' (str)"
    )
    assert err({"algo": "mamll"}) == (
        "algo: must be one of 'maml', 'fomaml', 'reptile', got 'mamll'; did you mean 'maml'?"
    )


def test_section_not_a_mapping():
    assert err({"outer": 3}) == (
        "outer: expected a mapping (section with keys lr, optimizer, lr_range, clip, milestones), got 3 (int)"
    )
    with pytest.raises(ConfigError) as info:
        from_dict(Config, [1, 2])
    assert str(info.value).startswith("config: expected a mapping (section with keys seed,")


def test_missing_required_key():
    with pytest.raises(ConfigError) as info:
        from_dict(Outer, {}, prefix="outer")
    assert str(info.value) == "missing required key 'outer.lr' (Meta learning rate.)"


def test_validate_hooks_name_the_key():
    # validate(prefix) with field_error
    assert err({"outer": {"lr_range": [2, 1]}}) == ("outer.lr_range: low must be <= high, got [2.0, 1.0]")
    # validate() without argument raising a plain ValueError gets the section prefix
    assert err({"inner": {"steps": 3, "lr": [0.1, 0.2]}}) == ("inner: lr has 2 entries but steps is 3")
    assert join_key("", "seed") == "seed" and join_key("a.b", "c") == "a.b.c"


def test_messages_are_one_line():
    with pytest.raises(ConfigError) as info:
        from_dict(Config, {"env_kwargs": "a\nb"})
    assert "\n" not in str(info.value)
    assert str(ConfigError("a\nb")) == "a b"


# ---------------------------------------------------------------- overrides


def test_override_value_parsing():
    out = apply_overrides(
        {},
        [
            "seed=3",
            "outer.lr=0.1",
            "inner.lr=[1, 2]",
            "inner.first_order=true",
            "device=auto",
            "outer.clip=null",
            "env_kwargs.name=a=b",
        ],
    )
    assert out == {
        "seed": 3,
        "outer": {"lr": 0.1, "clip": None},
        "inner": {"lr": [1, 2], "first_order": True},
        "device": "auto",
        "env_kwargs": {"name": "a=b"},
    }
    assert type(out["seed"]) is int and type(out["outer"]["lr"]) is float


def test_overrides_do_not_mutate_and_later_wins():
    data = {"outer": {"lr": 0.5}, "seed": 1}
    out = apply_overrides(data, ["outer.lr=0.25", "seed=2", "seed=7"])
    assert data == {"outer": {"lr": 0.5}, "seed": 1}
    assert out == {"outer": {"lr": 0.25}, "seed": 7}


def test_malformed_overrides():
    def msg(item: str) -> str:
        with pytest.raises(ConfigError) as info:
            apply_overrides({}, [item])
        return str(info.value)

    assert msg("outer.lr") == "malformed override 'outer.lr'; expected the form key.sub=value"
    assert msg("=3") == "malformed override '=3'; expected the form key.sub=value"
    assert msg("outer..lr=3") == "malformed override 'outer..lr=3'; expected the form key.sub=value"
    assert msg("outer.lr=") == ("override 'outer.lr=' has an empty value; expected the form key.sub=value")
    with pytest.raises(ConfigError) as info:
        apply_overrides({"seed": 0}, ["seed.x=1"])
    assert str(info.value) == "override 'seed.x=1': 'seed' is not a section (it is 0 (int))"
    assert msg("tags=[1,").startswith("override 'tags=[1,': cannot parse value '[1,' as YAML")


def test_unknown_override_key_caught_by_from_dict(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(Config, path, ["outer.lrr=0.1"])
    assert str(info.value).startswith("unknown key 'outer.lrr'; valid keys under 'outer'")


# ---------------------------------------------------------------- files


def test_missing_yaml_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(Config, path)
    assert str(info.value) == f"config file not found: '{path}'"


def test_yaml_syntax_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("seed: 1\nouter:\n  lr: [0.1, 0.2\n")
    with pytest.raises(ConfigError) as info:
        load_config(Config, path)
    message = str(info.value)
    assert message.startswith(f"{path}:4:1: invalid YAML: ")
    assert "\n" not in message


def test_yaml_duplicate_key(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("seed: 1\nseed: 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(Config, path)
    assert str(info.value) == f"{path}:2:1: invalid YAML: duplicate key 'seed'"


def test_top_level_not_a_mapping_and_empty_file(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(Config, path)
    assert str(info.value) == f"{path}: the top level must be a mapping of keys, got [1, 2] (list)"
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(Config, empty) == Config()


def test_round_trip(tmp_path):
    cfg = from_dict(
        Config,
        {
            "seed": 5,
            "device": "cuda",
            "tags": ["a"],
            "env_kwargs": {"goal": [1.0, 2.0]},
            "inner": {"steps": 2, "lr": [0.5, 0.25], "first_order": True},
            "outer": {"lr": 1e-5, "optimizer": "sgd", "lr_range": [0.001, 0.5], "clip": 1, "milestones": [3, 4]},
        },
    )
    plain = to_dict(cfg)
    assert plain["outer"]["lr_range"] == [0.001, 0.5]
    assert plain["outer"]["milestones"] == [3, 4]
    assert list(plain) == ["seed", "device", "algo", "tags", "env_kwargs", "inner", "outer"]
    assert from_dict(Config, plain) == cfg
    assert from_dict(Config, yaml.safe_load(yaml.safe_dump(plain))) == cfg

    path = tmp_path / "sub" / "resolved.yaml"
    dump_config(cfg, path)
    text = path.read_text()
    assert text.index("seed:") < text.index("device:") < text.index("inner:") < text.index("outer:")
    assert text.index("  lr: 1.0e-05") < text.index("  optimizer: sgd")
    assert load_config(Config, path) == cfg
    assert load_config(Config, path, ["inner.steps=3", "inner.lr=0.2"]).inner == Inner(
        steps=3, lr=0.2, first_order=True
    )
    assert [p for p in os.listdir(path.parent)] == ["resolved.yaml"]  # no temp files left


def test_dump_config_replaces_existing_file(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("old")
    dump_config(Config(seed=9), path)
    assert load_config(Config, path).seed == 9


# ---------------------------------------------------------------- schema helpers


def test_describe_lists_every_dotted_key():
    lines = describe(Config).splitlines()
    keys = [line.split(":", 1)[0] for line in lines]
    assert keys == [
        "seed",
        "device",
        "algo",
        "tags",
        "env_kwargs",
        "inner",
        "inner.steps",
        "inner.lr",
        "inner.first_order",
        "outer",
        "outer.lr",
        "outer.optimizer",
        "outer.lr_range",
        "outer.clip",
        "outer.milestones",
    ]
    assert "seed: int = 0  # Random seed." in lines
    assert "device: 'auto' | 'cpu' | 'cuda' = \"auto\"  # Torch device." in lines
    assert "inner.steps: int = 1 [>= 1]  # Inner-loop gradient steps." in lines
    assert "inner.lr: float | list[float] = 0.1 [> 0]  # Inner learning rate (or one per step)." in lines
    # the default comes from the section's default_factory instance
    assert "outer.lr: float = 0.001 [> 0]  # Meta learning rate." in lines
    assert "outer.lr: float (required) [> 0]  # Meta learning rate." in describe(Outer, "outer").splitlines()
    assert "algo: str = \"maml\" [one of 'maml', 'fomaml', 'reptile']  # Algorithm name." in lines
    assert "outer.lr_range: tuple[float, float] = [1e-05, 1.0]  # Allowed lr search range." in lines
    assert "outer.milestones: tuple[int, ...] = []  # Epochs at which the lr decays." in lines
    assert "inner: section  # Inner-loop (adaptation) settings." in lines


def test_option_requires_single_line_doc():
    with pytest.raises(TypeError):
        option(1, doc="")
    with pytest.raises(TypeError):
        option(1, doc="two\nlines")
    with pytest.raises(TypeError):
        option(1, doc="x", default_factory=list)
