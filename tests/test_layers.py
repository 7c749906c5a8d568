"""The layers of docs/design.md ("Layers"), checked on the source: who may import whom.

Every project module's imports are read with `ast`: every `import` and `from ... import`
anywhere in the file (so the lazy ones inside functions count), and the string passed to
`importlib.import_module` or `__import__`. Each must be allowed by `RULES`, and the graph of
module -> project modules it imports must have no cycle. The rules are data, written once:
docs/design.md shows them as the table `rules_table()` renders, and a test keeps the two
the same.
"""

from __future__ import annotations

import ast
import functools
import itertools
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DESIGN = REPO / "docs" / "design.md"


@dataclass(frozen=True)
class Layer:
    """What a layer's modules may import.

    Attributes:
        imports: the project modules it may import besides its own layer: a layer name
            (`core`: any module of it) or one module (`pipeline.shards`: that module only).
        forbidden: third-party top-level modules it never imports, not even lazily.
        why: one line for the reader of the rule.
    """

    imports: tuple[str, ...]
    forbidden: tuple[str, ...]
    why: str


NO_DAGSTER_NO_TORCH = ("dagster", "dagster_pipes", "torch")

# The floor first, the CLI last: a layer imports only what is listed here, below it.
RULES: dict[str, Layer] = {
    "core": Layer((), NO_DAGSTER_NO_TORCH, "what every layer uses; it uses no other layer"),
    "data_contracts": Layer(("core",), NO_DAGSTER_NO_TORCH, "the schemas of every stage"),
    "pipeline": Layer(
        ("core", "data_contracts"),
        NO_DAGSTER_NO_TORCH,
        "pure data work, so a Ray/Spark worker can run it",
    ),
    "training": Layer(
        ("core", "data_contracts", "pipeline.shards"),
        ("dagster",),
        "torch; reads pipeline/ through its shard reader, so torchrun runs it without Dagster",
    ),
    "assets": Layer(
        ("core", "data_contracts", "pipeline", "training"),
        (),
        "Dagster, on top of every layer",
    ),
    "prefpack": Layer(
        ("core", "data_contracts", "pipeline", "training", "assets"),
        (),
        "the `prefpack` command: every area's subcommands",
    ),
}


def rules_table() -> str:
    """`RULES` as the Markdown table docs/design.md shows."""
    rows = [
        "| layer | may import (besides itself) | never imports | why |",
        "| --- | --- | --- | --- |",
    ]
    for name, layer in RULES.items():
        shown = "`prefpack.py`" if name == "prefpack" else f"`{name}/`"
        imports = ", ".join(f"`{i}`" for i in layer.imports) or "nothing of the project"
        forbidden = ", ".join(f"`{f}`" for f in layer.forbidden) or "-"
        rows.append(f"| {shown} | {imports} | {forbidden} | {layer.why} |")
    return "\n".join(rows) + "\n"


# ---------------------------------------------------------------------------------------
# Reading the imports


@dataclass(frozen=True)
class Import:
    """One import statement (or import call) in a module."""

    module: str  # the importing module
    path: str  # its file, relative to the repository
    line: int
    text: str  # the statement as written
    target: str  # the absolute module name it imports


def project_modules(root: Path = REPO) -> dict[str, Path]:
    """Every module of the packages and single modules pyproject.toml ships, by name."""
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = [p.rstrip("*") for p in setuptools["packages"]["find"]["include"]]
    modules = {name: root / f"{name}.py" for name in setuptools["py-modules"]}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def _call_target(node: ast.Call) -> str | None:
    """The module named by `importlib.import_module("x")`, `import_module("x")` or
    `__import__("x")` with a literal name; None for any other call."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name not in ("import_module", "__import__") or not node.args:
        return None
    first = node.args[0]
    return first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None


def read_imports(module: str, path: Path, source: str, known: set[str]) -> list[Import]:
    """Every import in `source` (the module `module`, file `path`), wherever it stands.

    A `from x import y` imports the module `x.y` when that is one of `known` (the project's
    modules), else `x`; relative imports are made absolute.
    """
    return [
        Import(module, shown, line, text, full if full in known else base)
        for shown, line, text, full, base in _statements(module, path, source)
    ]


@functools.cache
def _statements(module: str, path: Path, source: str) -> tuple[tuple[str, int, str, str, str], ...]:
    """(file shown, line, text, `x.y`, `x`) per module an import names; `x.y` is `x` for a
    plain import or an import call. Parsed once per file text."""
    tree = ast.parse(source, filename=str(path))
    is_package = path.name == "__init__.py"
    shown = str(path.relative_to(REPO) if path.is_relative_to(REPO) else path)
    lines = source.splitlines()
    found = []

    def add(node: ast.expr | ast.stmt, full: str, base: str) -> None:
        end = node.end_lineno or node.lineno
        text = "\n".join(lines[node.lineno - 1 : end])[node.col_offset :]
        if end == node.lineno and node.end_col_offset is not None:
            text = text[: node.end_col_offset - node.col_offset]
        found.append((shown, node.lineno, " ".join(text.split()), full, base))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(node, alias.name, alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")[: None if is_package else -1]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            for alias in node.names:
                add(node, f"{base}.{alias.name}", base)
        elif isinstance(node, ast.Call) and (target := _call_target(node)):
            add(node, target, target)
    return tuple(found)


def _project_target(target: str, known: set[str]) -> str | None:
    """The project module `target` loads (its longest known prefix), or None."""
    name = target
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def _allowed(target: str, layer: Layer, own: str) -> bool:
    return target.split(".")[0] == own or any(
        target == rule or target.startswith(rule + ".") for rule in layer.imports
    )


def _describe(imp: Import) -> str:
    return f"{imp.path}:{imp.line}: `{imp.text}`"


def check_layers(
    modules: dict[str, Path], sources: dict[str, str], rules: dict[str, Layer] = RULES
) -> list[str]:
    """Every broken rule in `modules` (name -> file; `sources` holds their text): a module
    outside every layer, a forbidden third-party import, a project import its layer may not
    make, and an import cycle. Each problem names the file, line and import."""
    known = set(modules)
    problems: list[str] = []
    graph: dict[str, dict[str, Import]] = {m: {} for m in modules}
    for module, path in modules.items():
        layer_name = module.split(".")[0]
        layer = rules.get(layer_name)
        if layer is None:
            problems.append(f"{path}: module {module} is in no layer of the rules")
            continue
        for imp in read_imports(module, path, sources[module], known):
            target = _project_target(imp.target, known)
            if target is None:
                top = imp.target.split(".")[0]
                if top in layer.forbidden:
                    problems.append(f"{_describe(imp)}: {layer_name} never imports {top}")
                continue
            if not _allowed(target, layer, layer_name):
                may = ", ".join(layer.imports) or "nothing of the project"
                problems.append(
                    f"{_describe(imp)}: {layer_name} may not import {target} (only {may})"
                )
            if target != module:
                graph[module].setdefault(target, imp)
    cycle = find_cycle(graph)
    if cycle:
        steps = "; ".join(_describe(graph[a][b]) for a, b in itertools.pairwise(cycle))
        problems.append(f"import cycle {' -> '.join(cycle)}: {steps}")
    return problems


def find_cycle(graph: dict[str, dict[str, Import]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            step = next(stack[-1], None)
            if step is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(step) == 1:
                return [*path[path.index(step) :], step]
            elif not state.get(step):
                state[step] = 1
                path.append(step)
                stack.append(iter(sorted(graph.get(step, {}))))
    return None


def _read(modules: dict[str, Path]) -> dict[str, str]:
    return {name: path.read_text(encoding="utf-8") for name, path in modules.items()}


# ---------------------------------------------------------------------------------------
# The project


def test_every_module_keeps_its_layer_and_no_import_cycle() -> None:
    modules = project_modules()
    problems = check_layers(modules, _read(modules))
    assert not problems, "\n".join(problems)


def test_the_rules_cover_exactly_the_packages_pyproject_ships() -> None:
    shipped = {name.split(".")[0] for name in project_modules()}
    assert shipped == set(RULES)


def test_design_doc_shows_these_rules() -> None:
    text = DESIGN.read_text(encoding="utf-8")
    assert rules_table() in text, f"docs/design.md's layer table is not:\n{rules_table()}"
    assert "checked by tests/test_layers.py" in text


# ---------------------------------------------------------------------------------------
# The same check catches a broken rule


def _synthetic(tmp_path: Path, files: dict[str, str]) -> list[str]:
    """`check_layers` on the project with `files` (module -> source) added or replaced."""
    modules = project_modules()
    sources = _read(modules)
    for name, source in files.items():
        path = tmp_path / (name.replace(".", "/") + ".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
        modules[name], sources[name] = path, source
    return check_layers(modules, sources)


LAZY_TORCH = "def f():\n    import torch\n    return torch\n"


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (
            {"pipeline.bad": LAZY_TORCH},
            "pipeline/bad.py:2: `import torch`: pipeline never imports torch",
        ),
        (
            {"core.bad": "def f():\n    from dagster import asset\n"},
            "core/bad.py:2: `from dagster import asset`: core never imports dagster",
        ),
        (
            {"training.bad": "import dagster as dg\n"},
            "training/bad.py:1: `import dagster as dg`: training never imports dagster",
        ),
        (
            {"pipeline.bad": "import importlib\nm = importlib.import_module('torch.nn')\n"},
            "pipeline/bad.py:2: `importlib.import_module('torch.nn')`: pipeline never imports torch",
        ),
        (
            {"training.bad": "from pipeline.tokenize import load_tokenizer\n"},
            "training/bad.py:1: `from pipeline.tokenize import load_tokenizer`: training may not import pipeline.tokenize",
        ),
        (
            {"training.bad": "from pipeline import ingest\n"},
            "training/bad.py:1: `from pipeline import ingest`: training may not import pipeline.ingest",
        ),
        (
            {"core.bad": "from pipeline.shards import ShardError\n"},
            "core/bad.py:1: `from pipeline.shards import ShardError`: core may not import pipeline.shards",
        ),
        (
            {"data_contracts.bad": "def f():\n    from assets import keys\n"},
            "data_contracts/bad.py:2: `from assets import keys`: data_contracts may not import assets.keys",
        ),
        (
            {"pipeline.bad": "from training.train_config import TrainConfig\n"},
            "pipeline/bad.py:1: `from training.train_config import TrainConfig`: pipeline may not import training.train_config",
        ),
        ({"pipeline.bad": "from . import shards\n"}, None),  # relative, allowed
        ({"training.bad": "from pipeline.shards import ShardReader\n"}, None),
        ({"stray.bad": "x = 1\n"}, "module stray.bad is in no layer of the rules"),
    ],
)
def test_a_broken_rule_is_named_with_file_line_and_import(tmp_path, files, expected) -> None:
    problems = _synthetic(tmp_path, files)
    if expected is None:
        assert not problems, problems
    else:
        assert len(problems) == 1 and expected in problems[0], problems


def test_a_cycle_through_a_lazy_import_is_found(tmp_path) -> None:
    problems = _synthetic(
        tmp_path,
        {
            "training.cycle_a": "from training import cycle_b\n",
            "training.cycle_b": "def f():\n    from training.cycle_a import g\n",
        },
    )
    assert len(problems) == 1, problems
    assert problems[0].startswith(
        "import cycle training.cycle_a -> training.cycle_b -> training.cycle_a"
    )
    assert "training/cycle_b.py:2: `from training.cycle_a import g`" in problems[0]
