"""Settings of a config dataclass: one description per field, read by every front end.

Each field of `CurateConfig`, `TokenizeConfig`, `PackConfig` and `TrainConfig` is declared
with `setting(default, help, ...)`: its help text, its range and, rarely, a flag name.
From that one description come the command-line flags (`add_flags`: type, choices,
default and range shown in `--help`), the Dagster run configs
(`assets.configs.dagster_config`) and the range check every config runs when it is built
(`check_settings`, from `__post_init__`). `config_from` builds the config from either
front end's values, so a bad value stops before any data or model is read, with the flag
named; beneath them it can put a preset's settings (`pipeline.presets`), which only the
values a user gave override (`only_given` flags, `assets.configs.given_values` of a
Dagster config).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from typing import Any

_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


class SettingError(ValueError):
    """A setting out of its range; the message names the flag and the value."""


def setting(
    default: Any,
    help: str,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    flag: str | None = None,
) -> Any:
    """A dataclass field with its help text, range (for numbers, or each number of a
    tuple; None always passes) and flag name (default `--field-name`)."""
    bounds = {k: v for k, v in (("gt", gt), ("ge", ge), ("lt", lt), ("le", le)) if v is not None}
    return dataclasses.field(
        default=default, metadata={"help": help, "bounds": bounds, "flag": flag}
    )


def flag_name(f: dataclasses.Field) -> str:
    """The command-line flag of field `f`."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _range_text(bounds: dict[str, float]) -> str:
    return " and ".join(f"{_BOUNDS[k]} {v:g}" for k, v in bounds.items())


def _out_of_range(value: Any, bounds: dict[str, float]) -> bool:
    numbers = value if isinstance(value, tuple) else (value,)
    for x in numbers:
        if not isinstance(x, int | float) or isinstance(x, bool):
            continue
        if math.isnan(x):
            return True
        if any(
            (k == "gt" and not x > v)
            or (k == "ge" and not x >= v)
            or (k == "lt" and not x < v)
            or (k == "le" and not x <= v)
            for k, v in bounds.items()
        ):
            return True
    return False


def setting_problems(config: Any) -> list[str]:
    """Every field of `config` outside its declared range or choices, flags named."""
    hints = typing.get_type_hints(type(config))
    problems = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        choices = _choices(hints[f.name])
        if choices and value not in choices:
            shown = ", ".join(map(str, choices))
            problems.append(f"{flag_name(f)} must be one of {shown}, got {value!r}")
        bounds = f.metadata.get("bounds") or {}
        if value is not None and _out_of_range(value, bounds):
            problems.append(f"{flag_name(f)} must be {_range_text(bounds)}, got {value!r}")
    return problems


def check_settings(config: Any) -> None:
    """Raises: SettingError listing every field of `config` out of range."""
    problems = setting_problems(config)
    if problems:
        raise SettingError("; ".join(problems))


# ---------------------------------------------------------------------------------------
# Types


def without_none(hint: Any) -> tuple[Any, bool]:
    """(the type inside `X | None`, whether None is allowed)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


def _choices(hint: Any) -> tuple[Any, ...]:
    base, _ = without_none(hint)
    return typing.get_args(base) if typing.get_origin(base) is typing.Literal else ()


# ---------------------------------------------------------------------------------------
# Command-line flags


def add_flags(
    group: argparse._ActionsContainer,
    cls: type,
    names: typing.Iterable[str] | None = None,
    *,
    only_given: bool = False,
) -> None:
    """One flag per field of `cls` (or of `names`, in that order): its help with the
    default and range shown, and its type, choices or `nargs`. Optional numbers take
    `none`; the parsed value is stored under the field's name. With `only_given`, a flag
    left out is absent from the parsed namespace, so a preset can fill it (`config_from`'s
    `under`) and a flag given, even at its default, wins over the preset."""
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for name in names if names is not None else by_name:
        _add_flag(group, by_name[name], hints[name], only_given)


def _add_flag(
    group: argparse._ActionsContainer, f: dataclasses.Field, hint: Any, only_given: bool
) -> None:
    base, optional = without_none(hint)
    text = f.metadata["help"]
    bounds = f.metadata.get("bounds") or {}
    shown = f.default if not isinstance(f.default, tuple) else " ".join(map(str, f.default))
    notes = [f"default: {shown}"]
    if bounds:
        notes.append(_range_text(bounds))
    default = argparse.SUPPRESS if only_given else f.default
    kwargs: dict[str, Any] = {"dest": f.name, "default": default}
    if base is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(base) is typing.Literal:
        kwargs["choices"] = typing.get_args(base)
    elif typing.get_origin(base) is tuple:
        kinds = typing.get_args(base)
        count = "+" if kinds[-1] is Ellipsis else len(kinds)
        kwargs |= {"nargs": count, "type": kinds[0], "metavar": kinds[0].__name__.upper()}
    else:
        kwargs |= {"type": _parser(base, optional), "metavar": base.__name__.upper()}
    if optional and base in (int, float):
        notes.append("none turns it off")
    kwargs["help"] = f"{text} ({'; '.join(notes)})".replace("%", "%%")
    group.add_argument(flag_name(f), **kwargs)


def _parser(base: type, optional: bool) -> typing.Callable[[str], Any]:
    def parse(text: str) -> Any:
        if optional and text.lower() == "none":
            return None
        return base(text)

    parse.__name__ = base.__name__  # argparse names the type in its error message
    return parse


def config_from(
    cls: type, values: Any, *, under: typing.Mapping[str, Any] | None = None, **given: Any
) -> Any:
    """`cls` built from the attributes of `values` named like its fields (parsed flags of
    `add_flags`, or a config made by `assets.configs.dagster_config`; lists become
    tuples), with `given` over them and `under` (a preset's settings) for the fields
    neither sets; raises SettingError when out of range."""
    fields = dict(under or {})
    for f in dataclasses.fields(cls):
        if hasattr(values, f.name):
            value = getattr(values, f.name)
            fields[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**(fields | given))
