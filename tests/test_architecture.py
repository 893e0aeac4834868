"""The package's shape, checked from its source: a layer order declared once (here), imports only downwards or
within a layer, no import circle, and no function longer than 150 lines.

Every import counts: module level, inside functions (a lazy import is still a dependency) and under
`if TYPE_CHECKING:`. A package's `__init__` is a facade over its own modules and is declared above them; importing a
module of a subpackage from outside it also depends on that subpackage's `__init__`, which Python runs first. The root
package is the exception: it binds its public names lazily (PEP 562), so importing it runs none of them.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "cifar_cnn"
MAX_FUNCTION_LINES = 150

# Bottom to top. A module may import modules of its own layer or of layers below it, never above.
LAYERS: list[list[str]] = [
    # ground floor: facts and small tools every layer may use
    ["version", "errors", "names", "choices", "atomic", "hooks", "metrics", "ema", "optim", "schedules", "calibration"],
    # data: decoding, sources, cache, splits, the tensor pipeline
    ["data.images", "data.split", "data.preprocess", "data.labels", "data.dataset"],
    ["data.sources", "data.augment"],
    ["data.store", "data.download", "data.pipeline"],
    ["data.catalog"],
    ["data.load", "data.stream"],
    ["data"],
    # what a run is built from
    ["recipes", "device"],
    ["models.registry"],
    ["models.seed_cnn", "models.resnet", "models.airbench", "models.hf"],
    ["models"],
    ["config"],
    ["checkpoint", "presets", "rundir", "distributed", "transfer"],
    # using a trained model
    ["evaluate", "predict_core"],
    ["predict", "onnx_predict", "report.figures", "calibrate"],
    ["explain"],
    ["report.browser"],
    ["report.html"],
    ["report.build"],
    ["report"],
    # training
    ["engine.loop"],
    ["engine.state"],
    ["engine.checkpointer"],
    ["engine.run"],
    ["engine"],
    # on top of the engine and of prediction
    ["export", "progress", "serve.limits", "serve.app", "serve"],
    ["workflow", "tune", "notebook_loop", "frontier", "lr_find"],
    ["bench"],
    ["cli"],
    ["__main__", "__init__"],
]


def module_name(path: Path) -> tuple[str, bool]:
    """('data.load', False) for data/load.py; ('data', True) for data/__init__.py; ('__init__', True) for the root."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        return (".".join(parts[:-1]) or "__init__"), True
    return ".".join(parts), False


def package_modules() -> dict[str, tuple[Path, bool]]:
    return {module_name(p)[0]: (p, module_name(p)[1]) for p in sorted(PACKAGE.rglob("*.py"))}


def _absolute(name: str, level: int, current: str, is_package: bool) -> str:
    """The dotted name (relative to the package) that `from <level dots><name> import ...` in `current` means."""
    if level == 0:
        return name.removeprefix("cifar_cnn").lstrip(".") or "__init__"
    base = [] if current == "__init__" else current.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, *([name] if name else [])]) or "__init__"


def imports_of(path: Path, current: str, is_package: bool, known: set[str]) -> set[str]:
    """Every module of the package that `path` imports, wherever the import statement is."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "cifar_cnn" or alias.name.startswith("cifar_cnn."):
                    found.add(_absolute(alias.name, 0, current, is_package))
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and not (node.module or "").startswith("cifar_cnn"):
                continue
            target = _absolute(node.module or "", node.level, current, is_package)
            submodules = {f"{target}.{a.name}".removeprefix("__init__.") for a in node.names}
            named = submodules & known
            # `from . import x` names submodules; `from .m import f` depends on m
            if node.module is not None or len(named) < len(submodules):
                found.add(target)
            found |= named
    found.discard(current)
    return found


def with_package_inits(name: str, deps: set[str], known: set[str]) -> set[str]:
    """`deps` plus the subpackages whose `__init__` Python runs first when `name` imports a module inside them from
    outside (importing data.pipeline from evaluate runs data/__init__ too)."""
    out = set(deps)
    for dep in deps:
        parts = dep.split(".")
        for i in range(1, len(parts)):
            package = ".".join(parts[:i])
            if package in known and name != package and not name.startswith(package + "."):
                out.add(package)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    known = set(modules)
    graph = {}
    for name, (path, is_pkg) in modules.items():
        graph[name] = with_package_inits(name, imports_of(path, name, is_pkg, known) & known, known)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a list of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def layer_violations(graph: dict[str, set[str]], layers: list[list[str]]) -> list[str]:
    level = {m: i for i, layer in enumerate(layers) for m in layer}
    return [
        f"{m} (layer {level[m]}) imports {d} (layer {level[d]}), which is above it"
        for m, deps in sorted(graph.items())
        for d in sorted(deps)
        if m in level and d in level and level[d] > level[m]
    ]


def test_every_module_is_declared_once_in_the_layers() -> None:
    declared = [m for layer in LAYERS for m in layer]
    assert len(declared) == len(set(declared)), "a module is declared in two layers"
    modules = set(package_modules())
    assert modules - set(declared) == set(), "modules missing from LAYERS: declare each new module in its layer"
    assert set(declared) - modules == set(), "LAYERS names modules that do not exist"


def test_no_import_against_the_layer_order() -> None:
    assert layer_violations(import_graph(), LAYERS) == []


def test_no_import_circle() -> None:
    assert find_cycle(import_graph()) is None


def test_the_checker_sees_every_kind_of_import(tmp_path: Path) -> None:
    """The parser counts lazy imports, TYPE_CHECKING imports and `from . import x`, and the checks can fail."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "from . import errors\n"
        "if TYPE_CHECKING:\n    from .engine import train\n"
        "def f():\n    from .report.build import build_report\n    import cifar_cnn.cli\n"
    )
    probe = tmp_path / "probe.py"
    probe.write_text(source)
    found = imports_of(probe, "metrics", False, set(package_modules()))
    assert found == {"errors", "engine", "report.build", "cli"}
    graph = import_graph()
    graph["metrics"] = graph["metrics"] | found
    assert len(layer_violations(graph, LAYERS)) == 3  # engine, report.build and cli are above metrics
    assert with_package_inits("predict", {"report.figures"}, {"report", "report.figures"}) == {
        "report.figures",
        "report",
    }
    assert with_package_inits("report.build", {"report.figures"}, {"report", "report.figures"}) == {"report.figures"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def function_lengths() -> list[tuple[int, str]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(PACKAGE)}:{node.name}"))
    return sorted(out, reverse=True)


def test_no_function_is_longer_than_150_lines() -> None:
    lengths = function_lengths()
    assert lengths, "no functions found: the checker is looking in the wrong place"
    assert [f"{name}: {n} lines" for n, name in lengths if n > MAX_FUNCTION_LINES] == []


@pytest.mark.parametrize("command", ["recipes", "predict-onnx", "data"])
def test_commands_that_need_no_torch_do_not_import_it(command: str, tmp_path: Path) -> None:
    """Building the parser and running torch-free commands leaves torch unimported."""
    argv = {
        "recipes": ["recipes"],
        "predict-onnx": ["predict", "--onnx", str(tmp_path / "missing.onnx"), str(tmp_path)],
        "data": ["data", "--data", str(tmp_path / "missing")],
    }[command]
    code = (
        "import sys\nfrom cifar_cnn.cli import build_parser, main\nbuild_parser()\n"
        f"rc = main({argv!r})\nprint('TORCH', 'torch' in sys.modules, rc)\n"
    )
    env = {"PYTHONPATH": str(PACKAGE.parent), "PATH": "/usr/bin:/bin", "CIFAR_CNN_HOME": str(tmp_path / "home")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    last = out.stdout.strip().splitlines()[-1]
    expected_rc = 0 if command == "recipes" else 2  # the others fail on the missing file, before needing torch
    assert last == f"TORCH False {expected_rc}", (out.stdout, out.stderr)


def test_the_readme_layout_names_every_module() -> None:
    """The README's layout block names each module file (by file name) and each subpackage, and nothing that is gone."""
    readme = (PACKAGE.parents[1] / "README.md").read_text()
    block = readme.split("### Layout", 1)[1].split("```text", 1)[1].split("```", 1)[0]
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.name == "__init__.py" and len(rel.parts) > 1:
            assert f"{rel.parts[0]}/" in block, f"README layout misses the package {rel.parts[0]}/"
        else:
            assert rel.name in block, f"README layout misses {rel}"
    for name in re.findall(r"\b([a-z_]+\.py)\b", block):
        assert any(p.name == name for p in PACKAGE.rglob(name)) or name.startswith("test_"), f"README names {name}"
