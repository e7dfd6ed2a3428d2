"""The code base keeps its shape: small modules and functions, engine imports at the top, no import cycle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "difffit"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 100


def modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text(), filename=str(path))
    return found


def imported(tree: ast.Module, module: str) -> list[tuple[str, ast.AST, bool]]:
    """(difffit module imported, node, whether it is inside a function), TYPE_CHECKING blocks left out."""
    out = []

    def visit(node: ast.AST, in_function: bool, package: str) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return  # annotations only: never executed
        in_function = in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # `from difffit.engine import train` imports a module too
                target = f"{node.module}.{alias.name}"
                out.append((target if target in all_modules else node.module, node, in_function))
        elif isinstance(node, ast.Import):
            out.extend((alias.name, node, in_function) for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child, in_function, package)

    visit(tree, False, module)
    return [(name, node, inner) for name, node, inner in out if name.startswith("difffit")]


all_modules = modules()


def test_no_module_or_function_is_too_long():
    long_modules, long_functions = [], []
    for name, tree in all_modules.items():
        lines = max((getattr(node, "end_lineno", 0) or 0) for node in ast.walk(tree))
        if lines > MAX_MODULE_LINES:
            long_modules.append(f"{name}: {lines} lines")
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}.{node.name}: {length} lines")
    assert long_modules == [] and long_functions == []


def test_engine_modules_import_each_other_at_the_top():
    inside = [f"{name}:{node.lineno} imports {target}" for name, tree in all_modules.items()
              if name.startswith("difffit.engine") for target, node, in_function in imported(tree, name)
              if in_function and target.startswith("difffit.engine")]
    assert inside == []


def test_no_import_cycle_counting_function_level_imports():
    graph = {name: {target for target, _, _ in imported(tree, name) if target in all_modules and target != name}
             for name, tree in all_modules.items()}
    # Importing a package runs its __init__: an edge to a submodule is also an edge to its package.
    for name in graph:
        graph[name] |= {parent for target in set(graph[name]) for parent in _parents(target)
                        if parent in graph and parent != name and not name.startswith(parent + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            raise AssertionError("import cycle: " + " -> ".join(cycle))


# The engine's layers, lowest first: a module imports only from its own layer or a lower one. Methods and
# evaluation are peers (sources samples; evaluation reads adapters through sources).
LAYERS = {"models": 1, "data": 2, "methods": 3, "evaluation": 3, "training": 4, "sharing": 5}


def layer(module: str) -> int:
    """0 for the plumbing at the engine's root (errors, io, hub, ...), 6 for the CLI."""
    parts = module.split(".")
    if parts[:2] == ["difffit", "cli"]:
        return 6
    return LAYERS.get(parts[2], 0) if parts[:2] == ["difffit", "engine"] and len(parts) > 2 else 0


def test_engine_dependencies_point_down():
    upward = [f"{name} (layer {layer(name)}) imports {target} (layer {layer(target)})"
              for name, tree in all_modules.items() if name.startswith("difffit.engine.")
              for target, _, _ in imported(tree, name)
              if target in all_modules and target != "difffit" and layer(target) > layer(name)]
    assert upward == []


def test_every_engine_subpackage_is_a_layer():
    packages = {p.name for p in (PACKAGE / "engine").iterdir() if (p / "__init__.py").is_file()}
    assert packages == set(LAYERS)
    for name in packages:
        doc = ast.get_docstring(all_modules[f"difffit.engine.{name}"])
        assert doc, f"engine/{name}/__init__.py needs a docstring saying what the layer is"


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def test_the_layout_test_sees_what_it_checks():
    """Guard against a vacuous pass: the walk finds the engine, its imports and the CLI's lazy imports."""
    assert {"difffit.engine.training.train", "difffit.cli", "difffit.engine.models.dit"} <= set(all_modules)
    train_imports = {target for target, _, _ in imported(all_modules["difffit.engine.training.train"], "")}
    assert "difffit.engine.training.config" in train_imports
    cli_inner = [t for t, _, inner in imported(all_modules["difffit.cli.train"], "") if inner]
    assert "difffit.engine.training.train" in cli_inner or "difffit.engine" in cli_inner


def test_fit_config_checks_the_options_without_the_code_that_loads_a_base_or_data():
    """FitConfig.validate decides from the options alone: engine/training/config.py imports nothing that loads
    a base, scans data, builds a method's modules, samples or reaches a tracker (engine.training.setup checks
    what needs the base or the data, where it loads them)."""
    loaders = ("difffit.engine.models.bases", "difffit.engine.models.dit", "difffit.engine.models.families",
               "difffit.engine.data.images", "difffit.engine.methods.trainable", "difffit.engine.evaluation.sample",
               "difffit.engine.training.trackers")
    name = "difffit.engine.training.config"
    assert [target for target, _, _ in imported(all_modules[name], name) if target.startswith(loaders)] == []
