"""A run config file for `prefpack run --config FILE.yaml` (the same file `dg launch --job
sample_job -c FILE.yaml` takes): read, checked before anything launches, turned into the
resources and op configs of the runs.

The file holds `ops:` (the configs of sample_job's assets) and `resources:` (sources,
tokenizer, model, compute). Its problems come back one line each, naming the key:
- keys, types and choices by Dagster's own validation of sample_job's run config
  (`dagster.validate_run_config`), an unknown key with the closest known one;
- ranges by the assets' config classes and the resources' (the bounds of each setting,
  which Dagster's config schema cannot express; pydantic checks them when a step starts);
- then the resources' own checks (`assets.resources`: source names, presets and options,
  input, model and tokenizer paths), which the assets also run as their steps start, and
  the files the ops name (eval and benchmark prompts, a chat template file).

How it combines with SAMPLE_CONFIG: `prefpack run --config` replaces it. An op the file
configures runs with the file's values, one it leaves out with the asset's defaults, and
each resource the file configures is built from the file's values alone. (`dg launch`
differs for ops left out: Dagster gives those sample_job's own config, SAMPLE_CONFIG's.)
The store is not set here: `--store` or `PREFPACK_STORE` roots both the store and the IO
manager.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from pathlib import Path
from typing import Any

import dagster as dg
import pydantic
import yaml

from assets.configs import (
    CurationConfig,
    PackingConfig,
    ReferenceConfig,
    TokenizationConfig,
    TrainingConfig,
)
from assets.resources import did_you_mean
from pipeline.templates import BUILTIN_TEMPLATES

# The config class of each sample_job asset that takes one (the type of its `config`
# argument): Dagster's run-config schema checks keys, types and choices, these the ranges.
OP_CONFIGS: dict[str, type[dg.Config]] = {
    "curated_pairs": CurationConfig,
    "tokenized_pairs": TokenizationConfig,
    "packed_shards": PackingConfig,
    "reference_logps": ReferenceConfig,
    "eval_reference_logps": ReferenceConfig,
    "trained_model": TrainingConfig,
}
# The files an op's config names (a template may also be a built-in name).
NAMED_FILES = {
    "curated_pairs": ("eval_prompts", "benchmark_prompts"),
    "tokenized_pairs": ("template",),
}
SECTIONS = ("ops", "resources")
STORE_RESOURCES = ("store", "io_manager")  # rooted by --store / PREFPACK_STORE together
_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
_SCALARS = {"Int": "an integer", "Float": "a number", "String": "a string", "Bool": "true or false"}


def read_run_config(path: Path) -> dict[str, Any]:
    """The file's run config (an empty file is an empty config).

    Raises:
        OSError: the file cannot be read.
        ValueError: it is not YAML, or not a mapping.
    """
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ValueError(f"{path}: not YAML{line}: {getattr(err, 'problem', err)}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: a run config is a mapping of ops: and resources:")
    return loaded


def config_problems(defs: dg.Definitions, run_config: Mapping[str, Any]) -> list[str]:
    """What is wrong with `run_config` for `defs`' sample_job, without reading any data or
    file it names: its sections, then Dagster's schema, then the ranges; one line per
    problem."""
    problems = [
        f"{key}: not read by prefpack run (it takes {' and '.join(SECTIONS)})"
        for key in run_config
        if key not in SECTIONS
    ]
    problems += [
        f"resources.{name}: set the store with --store or PREFPACK_STORE (it roots the IO "
        "manager too)"
        for name in STORE_RESOURCES
        if name in (run_config.get("resources") or {})
    ]
    if problems:
        return problems
    job = defs.resolve_job_def("sample_job")
    try:
        dg.validate_run_config(job, dict(run_config))
    except dg.DagsterInvalidConfigError as err:
        defaults = dg.validate_run_config(job)
        problems = [line for e in err.errors for line in _schema_problem(e, defaults, defs)]
        if any(len(_path(e)) < 2 for e in err.errors):  # `ops:` or `resources:` itself
            return problems
        # The ranges of the ops and resources whose keys and types are right.
        wrong = {".".join(_path(e)[:2]) for e in err.errors}
        return problems + _range_problems(defs, run_config, skip=wrong)
    return _range_problems(defs, run_config)


def configured_resources(defs: dg.Definitions, run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The resources the file configures, by name, each built from the file's values alone
    (as Dagster builds a resource that run config names); call after `config_problems`."""
    return {
        name: type(defs.resources[name])(**_config(section))
        for name, section in (run_config.get("resources") or {}).items()
    }


def launch_problems(resources: Mapping[str, Any], run_config: Mapping[str, Any]) -> list[str]:
    """What the runs would stop on, checked before they launch: the resources' own checks
    (`assets.resources`; every named source input, as a run may read every partition),
    named as the file names them (`resources.model.config.path`, not `model.path`), and
    the files the ops' configs name."""
    sources = resources["sources"]
    problems = [
        *sources.settings_problems(),
        *sources.input_problems(),
        *resources["tokenizer"].problems(),
        *resources["model"].problems(),
    ]
    given = run_config.get("resources") or {}
    ops = run_config.get("ops") or {}
    return [_file_key(problem, given) for problem in problems] + [
        f"ops.{op}.config.{field}: {value!r} does not exist"
        for op, fields in NAMED_FILES.items()
        for field in fields
        if (value := _config(ops.get(op)).get(field)) is not None
        and value not in BUILTIN_TEMPLATES
        and not Path(value).exists()
    ]


def _file_key(problem: str, given: Mapping[str, Any]) -> str:
    """`model.path: ...` as `resources.model.config.path: ...` when the file sets `model`."""
    name, _, rest = problem.partition(".")
    return f"resources.{name}.config.{rest}" if name in given else problem


def run_ops(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The file's `ops:` as `materialize_all` takes them (call after `config_problems`)."""
    return {"ops": dict(run_config.get("ops") or {})}


def _config(section: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """The `config:` of an op's or a resource's section (either may be left empty)."""
    return (section or {}).get("config") or {}


# ---------------------------------------------------------------------------------------
# Dagster's schema errors, one line each


def _path(error: Any) -> list[str]:
    """The keys from the root to where `error` (a `DagsterInvalidConfigError.errors` item)
    is: field names, list indices, map keys."""
    parts = []
    for entry in error.stack.entries:
        for attribute in ("field_name", "list_index", "map_key"):
            if hasattr(entry, attribute):
                parts.append(str(getattr(entry, attribute)))
                break
    return parts


def _known_keys(path: list[str], defaults: Mapping[str, Any], defs: dg.Definitions) -> list[str]:
    """The keys a mapping at `path` may hold: those of the job's fully defaulted config
    there, plus for a resource's `config` its class's fields (one whose default is made
    by a factory is missing from the defaults)."""
    node: Any = defaults
    for part in path:
        node = node.get(part) if isinstance(node, Mapping) else None
    keys = list(node) if isinstance(node, Mapping) else []
    if len(path) == 3 and path[0] == "resources" and path[2] == "config":
        fields = getattr(type(defs.resources.get(path[1])), "model_fields", {})
        keys += [k for k in fields if k not in keys]
    return keys


def _expected(snap: Any) -> str:
    """What a value of config type `snap` is, in words."""
    kind = snap.kind.value
    if kind == "ENUM":
        return "one of " + ", ".join(str(v.value) for v in snap.enum_values)
    if kind == "SCALAR":
        return _SCALARS.get(snap.key, snap.key)
    return "a list" if kind == "ARRAY" else "a mapping"


def _schema_problem(error: Any, defaults: Mapping[str, Any], defs: dg.Definitions) -> list[str]:
    """The lines for one of Dagster's config errors, each naming its key."""
    path = _path(error)
    where = ".".join(path)
    reason, data = error.reason.name, error.error_data
    if reason in ("FIELD_NOT_DEFINED", "FIELDS_NOT_DEFINED"):
        names = [data.field_name] if reason == "FIELD_NOT_DEFINED" else data.field_names
        known = _known_keys(path, defaults, defs)
        return [
            f"{'.'.join([*path, name])}: unknown key{did_you_mean(name, known)}" for name in names
        ]
    if reason in ("MISSING_REQUIRED_FIELD", "MISSING_REQUIRED_FIELDS"):
        names = [data.field_name] if reason == "MISSING_REQUIRED_FIELD" else data.field_names
        return [f"{'.'.join([*path, name])}: missing (required)" for name in names]
    if reason == "RUNTIME_TYPE_MISMATCH":
        expected = _expected(data.config_type_snap)
        return [f"{where or '(the file)'}: expected {expected}, got {data.value_rep}"]
    return [f"{where or '(the file)'}: {error.message.split(' Expected')[0]}"]


# ---------------------------------------------------------------------------------------
# Ranges


def _range_problems(
    defs: dg.Definitions, run_config: Mapping[str, Any], skip: Set[str] = frozenset()
) -> list[str]:
    """Each op config and resource config (but those in `skip`, as `ops.NAME`) built by its
    class, whose pydantic fields check the bounds and patterns the schema does not: one
    line per value out of range."""
    ops = run_config.get("ops") or {}
    resources = run_config.get("resources") or {}
    sections = [(f"ops.{name}", OP_CONFIGS.get(name), op) for name, op in ops.items()]
    sections += [
        (f"resources.{name}", type(defs.resources[name]), resource)
        for name, resource in resources.items()
        if name in defs.resources
    ]
    problems = []
    for section, cls, given in sections:
        if section in skip or cls is None:
            continue
        try:
            cls(**_config(given))
        except pydantic.ValidationError as err:
            problems += [_range_line(f"{section}.config", e) for e in err.errors()]
    return problems


def _range_line(where: str, error: Mapping[str, Any]) -> str:
    """One pydantic error as `key: must be >= 1, got -1` (as the command-line flags say it)."""
    key = ".".join([where, *map(str, error["loc"])])
    bound = next((k for k in _BOUNDS if k in error.get("ctx", {})), None)
    rule = f"must be {_BOUNDS[bound]} {error['ctx'][bound]}" if bound else error["msg"]
    return f"{key}: {rule}, got {error['input']!r}"
