"""The import rules of docs/ARCHITECTURE.md as plain functions over the source tree (no imports executed).

    modules = package_modules(REPO)                  module name -> file, kernels/ mapped as tokpost_fast.kernels
    imports = collect_imports(modules, REPO)          every import of the package's own modules, module level and
                                                      inside functions, relative ones resolved, plus
                                                      importlib.import_module("tokpost_fast....") calls
    layer_violations(imports)                         "file:line imports X (layer a name -> layer b name)"
    import_cycles(imports, folder_of_module)          each cycle between package folders, with the imports in it

tests/test_architecture.py applies them to this repository and checks them on synthetic trees; the rules about
file lengths and comments are in tests/source_text.py.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "tokpost_fast"
# The layer order, lowest first (docs/ARCHITECTURE.md, "Who may import whom"). A module belongs to the layer of its
# longest matching prefix; the package root itself matches only exactly, so a new top-level module has no layer
# until it is placed here.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("leaf", ("tokpost_fast", "tokpost_fast._C", "tokpost_fast.atomic", "tokpost_fast.checks", "tokpost_fast.images")),
    ("ops", ("tokpost_fast.ops", "tokpost_fast.kernels", "tokpost_fast.perturb")),
    ("data", ("tokpost_fast.data",)),
    ("models", ("tokpost_fast.models",)),
    ("losses", ("tokpost_fast.losses",)),
    ("config", ("tokpost_fast.config",)),
    ("training", ("tokpost_fast.training",)),
    ("metrics", ("tokpost_fast.metrics",)),
    ("stages", ("tokpost_fast.stages",)),
    ("report", ("tokpost_fast.report",)),
    ("entry", ("tokpost_fast.train", "tokpost_fast.evaluate", "tokpost_fast.sample", "tokpost_fast.pipeline")),
)
# Modules that exist without a .py file under the package folders (the compiled extension).
EXTRA_MODULES = ("tokpost_fast._C",)


@dataclass(frozen=True)
class Import:
    source: str         # the importing module
    target: str         # the imported module of the package (the deepest one that exists)
    where: str          # "path/relative/to/base.py:line"
    in_function: bool


# ----------------------------------------------------------------------------------------------------------- imports
def package_modules(repo: Path, roots: dict[str, str] | None = None) -> dict[str, Path]:
    """Module name -> file for every .py under each root folder; roots maps a module prefix to its folder."""
    roots = roots if roots is not None else {PACKAGE: PACKAGE, f"{PACKAGE}.kernels": "kernels"}
    modules: dict[str, Path] = {}
    for prefix, folder in roots.items():
        for path in sorted((repo / folder).rglob("*.py")):
            parts = path.relative_to(repo / folder).with_suffix("").parts
            if "__pycache__" in parts:
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((prefix, *parts))] = path
    return modules


def _deepest_known(name: str, known: set[str]) -> str:
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in known:
            return ".".join(parts[:n])
    return name


def _dynamic_import_name(call: ast.Call) -> str | None:
    """The module named by importlib.import_module("a.b") / __import__("a.b") / import_module(f"a.b.{x}")."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if name not in ("import_module", "__import__") or not call.args:
        return None
    arg = call.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
        return str(arg.values[0].value).rpartition(".")[0] or None
    return None


def _module_imports(name: str, path: Path, known: set[str], root: str, base: Path) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    where = path.relative_to(base).as_posix() if path.is_relative_to(base) else str(path)
    found: list[Import] = []

    def add(target: str, node: ast.AST, in_function: bool) -> None:
        target = _deepest_known(target, known)
        if target == root or target.startswith(root + "."):
            found.append(Import(name, target, f"{where}:{node.lineno}", in_function))

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node, in_function)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(anchor + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                child = f"{module}.{alias.name}"
                add(child if child in known else module, node, in_function)
        elif isinstance(node, ast.Call) and (dynamic := _dynamic_import_name(node)):
            add(dynamic, node, in_function)
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    return found


def collect_imports(modules: dict[str, Path], base: Path, root: str = PACKAGE,
                    extra_modules: tuple[str, ...] = EXTRA_MODULES) -> list[Import]:
    known = set(modules) | set(extra_modules)
    imports: list[Import] = []
    for name, path in sorted(modules.items()):
        imports += _module_imports(name, path, known, root, base)
    return list(dict.fromkeys(imports))      # `from x import a, b` of one module counts once


# ------------------------------------------------------------------------------------------------------------ layers
def layer_of(module: str, layers=LAYERS, root: str = PACKAGE) -> tuple[int, str] | None:
    """(index, name) of the module's layer, by longest matching prefix; None when no layer holds it."""
    best: tuple[int, int, str] | None = None
    for index, (layer, prefixes) in enumerate(layers):
        for prefix in prefixes:
            exact_only = prefix == root
            if module == prefix or (not exact_only and module.startswith(prefix + ".")):
                if best is None or len(prefix) > best[0]:
                    best = (len(prefix), index, layer)
    return None if best is None else (best[1], best[2])


def unmapped_modules(modules, layers=LAYERS, root: str = PACKAGE) -> list[str]:
    return sorted(m for m in modules if layer_of(m, layers, root) is None)


def layer_violations(imports: list[Import], layers=LAYERS, root: str = PACKAGE) -> list[str]:
    """One line per import of a higher layer than the importing module's own."""
    lines = []
    for imp in imports:
        source, target = layer_of(imp.source, layers, root), layer_of(imp.target, layers, root)
        if source is None or target is None or target[0] <= source[0]:
            continue
        how = " inside a function" if imp.in_function else ""
        lines.append(f"{imp.where} imports {imp.target}{how} "
                     f"(layer {source[0]} {source[1]} -> layer {target[0]} {target[1]})")
    return lines


# ------------------------------------------------------------------------------------------------------------ cycles
def folder_of(module: str, packages: set[str], root: str = PACKAGE) -> str:
    """The package folder a module lives in; a module directly under the root is its own node (train.py is not
    atomic.py's folder-mate in any sense the layers care about)."""
    if module in packages:
        return module
    parent = module.rpartition(".")[0]
    return module if parent in ("", root) else parent


def import_cycles(imports: list[Import], node_of) -> list[str]:
    """Each strongly connected component of the graph node_of(source) -> node_of(target), with its imports."""
    edges: dict[str, dict[str, list[str]]] = {}
    for imp in imports:
        a, b = node_of(imp.source), node_of(imp.target)
        if a != b:
            wheres = edges.setdefault(a, {}).setdefault(b, [])
            if imp.where not in wheres:
                wheres.append(imp.where)
            edges.setdefault(b, {})
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def strongconnect(v: str) -> None:     # Tarjan; the graphs here are a few hundred nodes deep at most
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            strongconnect(v)
    report = []
    for component in sorted(components):
        members = set(component)
        lines = [f"cycle between {', '.join(component)}:",
                 "    shortest through " + " -> ".join(_shortest_cycle(component[0], edges, members))]
        for a in component:
            for b, wheres in sorted(edges[a].items()):
                if b in members:
                    more = f" (+{len(wheres) - 3} more)" if len(wheres) > 3 else ""
                    lines.append(f"    {a} -> {b}: {', '.join(wheres[:3])}{more}")
        report.append("\n".join(lines))
    return report


def _shortest_cycle(start: str, edges: dict[str, dict[str, list[str]]], members: set[str]) -> list[str]:
    """start -> ... -> start by breadth-first search inside one strongly connected component."""
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(edges[v]):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start] if v != start else [start, start]
                if w in members and w not in parent:
                    parent[w] = v
                    following.append(w)
        frontier = following
    return [start]
