"""One description per setting: flags, help, ranges and Dagster configs from it."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Literal

import pytest

from assets.configs import dagster_config
from core.settings import (
    SettingError,
    add_flags,
    check_settings,
    config_from,
    setting,
)
from pipeline.curate import CurateConfig
from pipeline.pack import PackConfig
from pipeline.tokenized import TokenizeConfig
from training.train_config import TrainConfig


@dataclasses.dataclass(frozen=True)
class Example:
    rate: float = setting(0.5, "a rate", gt=0, le=1)
    count: int | None = setting(3, "a count", ge=1)
    mode: Literal["a", "b"] = setting("a", "a mode")
    pair: tuple[float, float] = setting((0.1, 0.2), "two numbers", ge=0, lt=1)
    names: tuple[str, ...] | None = setting(None, "some names")
    on: bool = setting(True, "a switch")
    width: int = setting(8, "renamed", ge=1, flag="--w")

    def __post_init__(self) -> None:
        check_settings(self)


def _parse(*argv: str) -> Example:
    parser = argparse.ArgumentParser()
    add_flags(parser, Example)
    return config_from(Example, parser.parse_args(argv))


def test_flags_parse_every_kind_of_field() -> None:
    assert _parse() == Example()
    parsed = _parse(
        "--rate", "1", "--count", "none", "--mode", "b", "--pair", "0", "0.5",
        "--names", "x", "y", "--no-on", "--w", "2",
    )  # fmt: skip
    assert parsed == Example(1.0, None, "b", (0.0, 0.5), ("x", "y"), False, 2)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--rate", "0"), "--rate must be > 0 and <= 1, got 0.0"),
        (("--rate", "nan"), "--rate must be > 0 and <= 1, got nan"),
        (("--count", "0"), "--count must be >= 1, got 0"),
        (("--pair", "0.5", "1"), "--pair must be >= 0 and < 1, got (0.5, 1.0)"),
        (("--w", "0"), "--w must be >= 1, got 0"),
    ],
)
def test_out_of_range_names_the_flag(argv: tuple[str, ...], message: str) -> None:
    with pytest.raises(SettingError) as err:
        _parse(*argv)
    assert str(err.value) == message


def test_every_problem_is_named_at_once() -> None:
    with pytest.raises(SettingError) as err:
        Example(rate=2, count=0, mode="c")  # type: ignore[arg-type]
    assert str(err.value).count("must be") == 3 and "--mode must be one of a, b" in str(err.value)


def test_help_shows_default_and_range() -> None:
    parser = argparse.ArgumentParser()
    add_flags(parser, Example)
    text = " ".join(parser.format_help().split())
    assert "a rate (default: 0.5; > 0 and <= 1)" in text
    assert "a count (default: 3; >= 1; none turns it off)" in text


@pytest.mark.parametrize("cls", [CurateConfig, TokenizeConfig, PackConfig, TrainConfig])
def test_every_setting_of_every_stage_has_help(cls: type) -> None:
    for f in dataclasses.fields(cls):
        assert f.metadata["help"], f.name


def test_dagster_configs_check_the_same_ranges() -> None:
    packing = dagster_config(PackConfig, "P")
    assert packing().max_len == PackConfig().max_len
    with pytest.raises(Exception, match="max_len"):
        packing(max_len=0)
    training = dagster_config(TrainConfig, "T", exclude=("out_dir",))
    with pytest.raises(Exception, match="beta"):
        training(beta=0.0)


def test_only_given_flags_go_over_a_preset_and_the_rest_under_it() -> None:
    parser = argparse.ArgumentParser()
    add_flags(parser, Example, only_given=True)
    preset = {"rate": 0.9, "count": 7, "on": False}
    args = parser.parse_args(["--count", "3", "--on"])  # both given at their default
    assert not hasattr(args, "rate")
    assert config_from(Example, args, under=preset) == Example(rate=0.9, count=3, on=True)
    assert config_from(Example, args, under=preset, count=5).count == 5  # `given` wins all
    assert config_from(Example, parser.parse_args([])) == Example()
    with pytest.raises(SettingError, match="--rate must be > 0"):
        config_from(Example, args, under={"rate": 0.0})
