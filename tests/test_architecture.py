"""The package's import graph, read from its source: no cycles, and every edge follows the
layer order of docs/architecture.md.

The graph counts every import: module level and inside functions, ``from . import x`` (an edge
to the submodule ``x``), ``importlib.import_module("ds4mlx.x")`` / ``__import__`` and a string
spelling a package module in a tuple, list, set or dict (the lazy tables of ``ds4mlx/__init__.py``). Nothing is
imported to build it, so a module that fails to import cannot hide an edge.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = "ds4mlx"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / PACKAGE

# Names a submodule may take from an ancestor package without depending on it: defined on the
# root's first lines, before it imports anything (Python runs ancestors before their children).
ANCESTOR_CONSTANTS = {"__version__"}

# Layer of each module: the longest matching prefix wins.
LAYER_OF = {
    "ds4mlx.config": "leaf",
    "ds4mlx.names": "leaf",
    "ds4mlx.state": "leaf",
    "ds4mlx.stage": "leaf",
    "ds4mlx.encoding": "leaf",
    "ds4mlx.progress": "leaf",
    "ds4mlx.terminal": "leaf",
    "ds4mlx.quant": "quant",
    "ds4mlx.ops": "ops",
    "ds4mlx.kernels": "kernels",
    "ds4mlx.layers": "layers",
    "ds4mlx.model": "model",
    "ds4mlx.io": "io",
    "ds4mlx.hub": "io",  # finds / downloads checkpoint files for the readers
    "ds4mlx.tokenizer": "tokenizer",
    "ds4mlx.synthetic": "synthetic",
    "ds4mlx.demo": "synthetic",
    "ds4mlx.loader": "loader",
    "ds4mlx.mlx_lm_model": "loader",  # mlx-lm's way into the model, for converted directories
    "ds4mlx.mlx_lm_files": "loader",  # the files of that way in, written without importing the model
    "ds4mlx.convert": "convert",
    "ds4mlx.generate": "app",
    "ds4mlx.speculative": "app",
    "ds4mlx.bench": "app",
    "ds4mlx.info": "app",
    "ds4mlx.selftest": "app",
    "ds4mlx.memory": "app",
    "ds4mlx.imatrix": "app",
    "ds4mlx.prompt_cache": "app",
    "ds4mlx.server": "app",
    "ds4mlx.distributed": "app",
    "ds4mlx.cli": "cli",
    "ds4mlx.cli_output": "cli",
    "ds4mlx.cli_options": "cli",
    "ds4mlx.chat_session": "cli",
    "ds4mlx.console": "cli",
    "ds4mlx.__main__": "cli",
    "ds4mlx": "cli",  # the package root re-exports load / generate for the user
}

# Cycles accepted, each with its reason; any other cycle fails. A package and its own submodule
# only: a cycle between layers or between sibling modules is never accepted.
ALLOWED_CYCLES: list[set[str]] = []  # none today (kernels/check.py installs itself into dispatch)

# What each layer may import directly (besides itself); the order of docs/architecture.md:
# codecs (quant) -> ops -> kernels -> layers -> model; io readers below the loader; CLI on top.
MAY_IMPORT = {
    "leaf": set(),
    "quant": {"leaf"},
    "ops": {"leaf"},
    "kernels": {"leaf", "quant", "ops"},
    "layers": {"leaf", "quant", "ops", "kernels"},
    "model": {"leaf", "quant", "ops", "kernels", "layers"},
    "io": {"leaf", "quant"},
    "tokenizer": {"leaf"},
    "synthetic": {"leaf", "quant", "io", "tokenizer"},
    "loader": {"leaf", "quant", "layers", "model", "io", "tokenizer", "synthetic"},
    "convert": {"leaf", "quant", "io", "tokenizer", "loader"},
}
# the applications on top may use any layer below them; the CLI also the applications
MAY_IMPORT["app"] = set(MAY_IMPORT) - {"app", "cli"}
MAY_IMPORT["cli"] = set(MAY_IMPORT) - {"cli"}


# ----------------------------------------------------------------------------- the graph
def package_modules(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> source file, for every ``.py`` under ``root`` (the package folder)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _import_call_target(node: ast.Call) -> str | None:
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name in ("import_module", "__import__") and node.args:
        arg = node.args[0]
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            return arg.value
    return None


def module_imports(name: str, path: Path, modules: dict[str, Path], package: str) -> set[str]:
    """The package modules ``name`` (source ``path``) imports, anywhere in its source."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def add(target: str) -> None:
        # a dotted name that is not a module is an attribute of the longest module prefix
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == package:
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")[: len(here.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != package:
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in modules:
                    add(sub)
                elif name.startswith(source + ".") and alias.name in ANCESTOR_CONSTANTS:
                    continue
                else:
                    add(source)
        elif isinstance(node, ast.Call) and (target := _import_call_target(node)):
            if target.split(".")[0] == package:
                add(target)
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)):
            # a module name in a table is a lazy import (a logger's name is not: call arguments
            # do not count, only import_module / __import__ above)
            for item in (node.keys + node.values) if isinstance(node, ast.Dict) else node.elts:
                if (isinstance(item, ast.Constant) and isinstance(item.value, str)
                        and item.value.startswith(package + ".") and item.value in modules):
                    add(item.value)
    return found


def import_graph(root: Path = PACKAGE_DIR, package: str = PACKAGE) -> dict[str, set[str]]:
    modules = package_modules(root, package)
    return {name: module_imports(name, path, modules, package) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def layer(module: str) -> str:
    # a prefix covers its subpackage; the root names only itself (else it would cover all)
    prefixes = [p for p in LAYER_OF if module == p or (p != PACKAGE and module.startswith(p + "."))]
    if not prefixes:
        raise KeyError(f"{module} has no layer in LAYER_OF (add it, and a row to docs/architecture.md)")
    return LAYER_OF[max(prefixes, key=len)]


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for src in sorted(graph):
        for dst in sorted(graph[src]):
            a, b = layer(src), layer(dst)
            if a != b and b not in MAY_IMPORT[a]:
                bad.append(f"{src} ({a}) imports {dst} ({b})")
    return bad


# ----------------------------------------------------------------------------- the package
@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_every_module_has_a_layer(graph):
    missing = []
    for module in graph:
        try:
            layer(module)
        except KeyError as e:
            missing.append(str(e))
    assert not missing, "\n".join(missing)


def test_no_import_cycles(graph):
    assert [c for c in find_cycles(graph) if set(c) not in ALLOWED_CYCLES] == []


def test_imports_follow_the_layer_order(graph):
    assert layer_violations(graph) == []


def test_allowed_cycles_are_a_package_and_its_own_submodules():
    for cycle in ALLOWED_CYCLES:
        package = min(cycle, key=len)
        assert all(m == package or m.rpartition(".")[0] == package for m in cycle), cycle


def test_layer_order_is_acyclic():
    # the allowed-import relation itself must be a DAG, else the order says nothing
    allowed = {a: {b for b in deps if b != a} for a, deps in MAY_IMPORT.items()}
    assert find_cycles(allowed) == []


def test_nothing_below_the_cli_imports_it(graph):
    cli = {"ds4mlx.cli", "ds4mlx.console"}
    bad = [f"{src} imports {dst}" for src, deps in graph.items() for dst in deps & cli
           if layer(src) != "cli"]
    assert bad == []


def test_readers_return_tensors_and_never_build_a_model(graph):
    bad = [f"{src} imports {dst}" for src, deps in graph.items() if layer(src) == "io"
           for dst in deps if layer(dst) in {"loader", "model", "layers", "kernels"}]
    assert bad == []


def test_the_graph_sees_the_known_edges(graph):
    # edges of each kind the scanner must find: module level, inside a function, importlib table
    assert "ds4mlx.kernels" in graph["ds4mlx.model.moe"]
    assert "ds4mlx.kernels.emu" in graph["ds4mlx.kernels.dispatch"]  # imported inside compiled()
    assert "ds4mlx.loader" in graph["ds4mlx"]  # the lazy importlib table of __init__
    assert "ds4mlx.quant.gguf.iq2_xxs" in graph["ds4mlx.kernels.source"]  # from ..quant.gguf import x


def _documented(doc: str) -> tuple[set[str], list[str], list[str]]:
    """(files, folders, patterns) the module table of docs/architecture.md names; a bare file
    name in a cell sits in the folder of the cell's first path (`ds4mlx/server/app.py`, `params.py`)."""
    files, folders, patterns = set(), [], []
    for line in doc.splitlines():
        if not line.startswith("| `ds4mlx"):
            continue
        folder = ""
        for token in re.findall(r"`([^`]+)`", line.split("|")[1]):
            token = token.split(" ")[0]
            if token.startswith(PACKAGE + "/"):
                folder = token.rpartition("/")[0]
            else:
                token = f"{folder}/{token}"
            if token.endswith("/"):
                folders.append(token)
            elif "<" in token or "*" in token:
                patterns.append(re.escape(token).replace(re.escape("<type>"), r"\w+")
                                .replace(re.escape("*"), r"[^/]+"))
            else:
                files.add(token)
    return files, folders, patterns


def test_every_module_has_a_row_in_the_docs():
    files, folders, patterns = _documented((PACKAGE_DIR.parent / "docs/architecture.md").read_text())
    missing = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        rel = path.relative_to(PACKAGE_DIR.parent).as_posix()
        if path.name == "__init__.py" and not path.read_text().strip():
            continue  # an empty package marker
        if rel in files or any(rel.startswith(f) for f in folders) or any(
                re.fullmatch(p, rel) for p in patterns):
            continue
        missing.append(rel)
    assert missing == [], "add a row to docs/architecture.md for each"


def test_own_modules_are_never_optional():
    # an ``except ImportError`` around the package's own imports would hide a broken module
    modules = package_modules(PACKAGE_DIR, PACKAGE)
    found = []
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Try):
                continue
            caught = {getattr(h.type, "id", None) for h in node.handlers} | {
                getattr(e, "id", None) for h in node.handlers if isinstance(h.type, ast.Tuple)
                for e in h.type.elts}
            if not caught & {"ImportError", "ModuleNotFoundError"}:
                continue
            body = ast.Module(body=node.body, type_ignores=[])
            for inner in ast.walk(body):
                own = (isinstance(inner, ast.ImportFrom)
                       and (inner.level or (inner.module or "").split(".")[0] == PACKAGE)) or (
                    isinstance(inner, ast.Import)
                    and any(a.name.split(".")[0] == PACKAGE for a in inner.names))
                if own:
                    found.append(f"{name}:{inner.lineno}")
    assert found == []


# ----------------------------------------------------------------------------- the checker itself
def _write_package(root: Path, files: dict[str, str]) -> Path:
    pkg = root / "pkg"
    for rel, text in files.items():
        path = pkg / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return pkg


def test_scanner_finds_function_local_and_string_imports(tmp_path):
    pkg = _write_package(tmp_path, {
        "__init__.py": "",
        "a.py": "def f():\n    from .b import thing\n    return thing\n",
        "b.py": "import importlib\n\ndef g():\n    return importlib.import_module('pkg.c')\n",
        "c.py": "import logging\nlog = logging.getLogger('pkg.a')\nTABLE = {'x': ('pkg.sub.d', 'x')}\n",
        "sub/__init__.py": "",
        "sub/d.py": "from .. import a\nfrom pkg.c import TABLE\n",
    })
    graph = import_graph(pkg, "pkg")
    assert graph["pkg.a"] == {"pkg.b"}
    assert graph["pkg.b"] == {"pkg.c"}
    assert graph["pkg.c"] == {"pkg.sub.d"}
    assert graph["pkg.sub.d"] == {"pkg.a", "pkg.c"}
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.sub.d"]]


def _new(found: list, before: list) -> list:
    """What a check finds in the broken graph that it does not find in the package itself."""
    return [x for x in found if x not in before]


def test_a_back_edge_fails_both_checks(graph):
    # a codec that reaches up into the model: against the layer order, and it closes a cycle
    # (model.moe -> kernels -> quant.gguf -> quant.gguf.mxfp4 -> quant.codecs -> model.moe)
    broken = {k: set(v) for k, v in graph.items()}
    broken["ds4mlx.quant.codecs"].add("ds4mlx.model.moe")
    assert _new(layer_violations(broken), layer_violations(graph)) == [
        "ds4mlx.quant.codecs (quant) imports ds4mlx.model.moe (model)"]
    cycles = _new(find_cycles(broken), find_cycles(graph))
    assert len(cycles) == 1 and {"ds4mlx.quant.codecs", "ds4mlx.model.moe",
                                 "ds4mlx.kernels"} <= set(cycles[0])


def test_a_reader_building_the_model_is_caught(graph):
    broken = {k: set(v) for k, v in graph.items()}
    broken["ds4mlx.io.gguf"].add("ds4mlx.loader")
    assert _new(layer_violations(broken), layer_violations(graph)) == [
        "ds4mlx.io.gguf (io) imports ds4mlx.loader (loader)"]
    assert _new(find_cycles(broken), find_cycles(graph))  # the loader imports io.gguf
