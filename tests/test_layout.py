"""The code base keeps its shape: small modules and functions, engine imports at the top, no import cycle."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import typer

PACKAGE = Path(__file__).resolve().parents[1] / "difffit"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80
MAX_PARAMETERS = 12  # self/cls not counted; a Typer command's parameters are its options, so it may have more


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


def functions(tree: ast.Module) -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Every function of a module with its __qualname__ (`Class.method`, `outer.<locals>.inner`)."""
    out = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                out.append((prefix + child.name, child))
                visit(child, f"{prefix}{child.name}.<locals>.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return out


def parameter_names(node: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    args = node.args
    names = [a.arg for a in [*args.posonlyargs, *args.args, args.vararg, *args.kwonlyargs, args.kwarg] if a]
    return names[1:] if names[:1] in (["self"], ["cls"]) else names


def typer_commands() -> set[tuple[str, str]]:
    """(module, qualname) of every function Typer runs as a command or callback: those decorated with
    `@<app>.command(...)` / `@<app>.callback(...)`, and those registered on the CLI's app by a call
    (`app.command(...)(train.fit)`), read from the app itself, its sub-apps included."""
    from difffit.cli import app

    found = {
        (name, qualname)
        for name, tree in all_modules.items()
        for qualname, node in functions(tree)
        if any(
            isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) and d.func.attr in ("command", "callback")
            for d in node.decorator_list
        )
    }
    apps = [app]
    while apps:
        current = apps.pop()
        infos = [*current.registered_commands, current.registered_callback]
        for info in filter(None, infos):
            if info.callback is not None:
                function = inspect.unwrap(info.callback)
                found.add((function.__module__, function.__qualname__))
        apps.extend(
            group.typer_instance for group in current.registered_groups if isinstance(group.typer_instance, typer.Typer)
        )
    return found


def oversized(commands: set[tuple[str, str]]) -> tuple[list[str], list[str], list[str]]:
    """(modules over MAX_MODULE_LINES, functions over MAX_FUNCTION_LINES, functions over MAX_PARAMETERS
    other than the Typer `commands`), each entry naming its module, function and size."""
    long_modules, long_functions, many_parameters = [], [], []
    for name, tree in all_modules.items():
        lines = max((getattr(node, "end_lineno", 0) or 0) for node in ast.walk(tree))
        if lines > MAX_MODULE_LINES:
            long_modules.append(f"{name}: {lines} lines")
        for qualname, node in functions(tree):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                long_functions.append(f"{name}.{qualname}: {length} lines")
            count = len(parameter_names(node))
            if count > MAX_PARAMETERS and (name, qualname) not in commands:
                many_parameters.append(f"{name}.{qualname}: {count} parameters")
    return long_modules, long_functions, many_parameters


def test_no_module_or_function_is_too_long():
    long_modules, long_functions, _ = oversized(typer_commands())
    assert long_modules == [], f"modules over {MAX_MODULE_LINES} lines: {long_modules}"
    assert long_functions == [], f"functions over {MAX_FUNCTION_LINES} lines: {long_functions}"


def test_only_typer_commands_take_many_parameters():
    _, _, many_parameters = oversized(typer_commands())
    assert many_parameters == [], (
        f"functions with over {MAX_PARAMETERS} parameters (group them in a dataclass): {many_parameters}"
    )


def test_the_limits_see_typer_commands_and_only_them():
    """The exemption is the commands the app runs, not every function in cli/ (a helper there is held to it)."""
    commands = typer_commands()
    assert {("difffit.cli.train", "fit"), ("difffit.cli.evaluate", "eval_fid"), ("difffit.cli", "_root")} <= commands
    assert all(name.startswith("difffit.cli") for name, _ in commands)
    assert ("difffit.cli.evaluate", "_render_metrics") not in commands
    _, _, without_exemption = oversized(set())
    assert any(entry.startswith("difffit.cli.train.fit:") for entry in without_exemption)


def test_engine_modules_import_each_other_at_the_top():
    inside = [
        f"{name}:{node.lineno} imports {target}"
        for name, tree in all_modules.items()
        if name.startswith("difffit.engine")
        for target, node, in_function in imported(tree, name)
        if in_function and target.startswith("difffit.engine")
    ]
    assert inside == []


def test_no_import_cycle_counting_function_level_imports():
    graph = {
        name: {target for target, _, _ in imported(tree, name) if target in all_modules and target != name}
        for name, tree in all_modules.items()
    }
    # Importing a package runs its __init__: an edge to a submodule is also an edge to its package.
    for name in graph:
        graph[name] |= {
            parent
            for target in set(graph[name])
            for parent in _parents(target)
            if parent in graph and parent != name and not name.startswith(parent + ".")
        }
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
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
    upward = [
        f"{name} (layer {layer(name)}) imports {target} (layer {layer(target)})"
        for name, tree in all_modules.items()
        if name.startswith("difffit.engine.")
        for target, _, _ in imported(tree, name)
        if target in all_modules and target != "difffit" and layer(target) > layer(name)
    ]
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
    loaders = (
        "difffit.engine.models.bases",
        "difffit.engine.models.dit",
        "difffit.engine.models.families",
        "difffit.engine.data.images",
        "difffit.engine.methods.trainable",
        "difffit.engine.evaluation.sample",
        "difffit.engine.training.trackers",
    )
    name = "difffit.engine.training.config"
    assert [target for target, _, _ in imported(all_modules[name], name) if target.startswith(loaders)] == []
