"""The package's shape, checked from its source: no import cycles (function-local imports included), the
command line as a layer on top, no module over 600 lines, and a stated reason for every function-local
import of the package's own modules.

The import graph is read with ``ast`` (nothing is imported). Importing ``a.b.c`` runs ``a``, ``a.b`` and
``a.b.c``, so an import of ``a.b.c`` from module ``m`` is an edge from ``m`` to each of them, except to
``m``'s own parent packages, which are already running when ``m`` runs. Imports under
``if TYPE_CHECKING:`` never run and are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "rwkvkit"
MAX_MODULE_LINES = 600
# entry shims (``python -m ...``) may import the command line they start
ENTRY_SHIMS = {"rwkvkit.__main__", "rwkvkit.train.__main__", "rwkvkit.demo.__main__"}


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def package_modules(root: Path = PACKAGE_DIR) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _ImportCollector(ast.NodeVisitor):
    """Collects (imported module names, line, inside a function) for every import that can run."""

    def __init__(self, name: str, package: bool) -> None:
        self.name = name
        self.package = name if package else name.rpartition(".")[0]
        self.depth = 0
        self.found: list[tuple[list[str], int, bool]] = []

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node: ast.Import) -> None:
        self.found.append(([a.name for a in node.names], node.lineno, self.depth > 0))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.split(".")[: len(self.package.split(".")) - node.level + 1]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        # ``from a import b`` may import the submodule a.b: count it when it is one
        names = [module] + [f"{module}.{a.name}" for a in node.names]
        self.found.append((names, node.lineno, self.depth > 0))


def imports_of(name: str, path: Path) -> list[tuple[list[str], int, bool]]:
    collector = _ImportCollector(name, is_package(path))
    collector.visit(ast.parse(path.read_text(), str(path)))
    return collector.found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        if is_package(path):
            ancestors.add(name)
        for names, _, _ in imports_of(name, path):
            for target in names:
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    prefix = ".".join(parts[:i])
                    if prefix in modules and prefix not in ancestors and prefix != name:
                        graph[name].add(prefix)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_cycle_finder_sees_a_cycle_hidden_in_a_function(tmp_path):
    pkg = tmp_path / "rwkvkit"
    (pkg / "models").mkdir(parents=True)
    (pkg / "quant").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models" / "__init__.py").write_text("def load():\n    from rwkvkit.quant import q\n")
    (pkg / "models" / "common.py").write_text("X = 1\n")
    (pkg / "quant" / "__init__.py").write_text("from rwkvkit.models.common import X\n")
    (pkg / "quant" / "layers.py").write_text("from rwkvkit.quant import helpers\n")
    (pkg / "quant" / "helpers.py").write_text("from . import layers\n")  # relative, inside a package
    cycles = find_cycles(import_graph(package_modules(pkg)))
    # quant -> models (parent of models.common) -> quant (inside a function); quant.layers -> its own
    # parent package is not a cycle; quant.helpers <-> quant.layers is one
    assert cycles == [["rwkvkit.models", "rwkvkit.quant"], ["rwkvkit.quant.helpers", "rwkvkit.quant.layers"]]


def test_no_import_cycles():
    cycles = find_cycles(import_graph(package_modules()))
    assert not cycles, "import cycles among rwkvkit modules:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_command_line_is_a_layer_on_top():
    offenders = []
    for name, path in package_modules().items():
        if name == "rwkvkit.cli" or name.startswith("rwkvkit.cli.") or name in ENTRY_SHIMS:
            continue
        for names, line, _ in imports_of(name, path):
            if any(n == "rwkvkit.cli" or n.startswith("rwkvkit.cli.") or n == "argparse" for n in names):
                offenders.append(f"{path.relative_to(PACKAGE_DIR.parent)}:{line}")
    assert not offenders, "rwkvkit.cli or argparse imported outside rwkvkit/cli/: " + ", ".join(offenders)


@pytest.mark.parametrize("name", sorted(package_modules()))
def test_module_size(name):
    path = package_modules()[name]
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.relative_to(PACKAGE_DIR.parent)} has {lines} lines"


def _has_reason(source: list[str], line: int) -> bool:
    """A comment on the import's line, or above the run of import lines it belongs to."""
    if "#" in source[line - 1]:
        return True
    i = line - 2
    while i >= 0 and source[i].strip().startswith(("from ", "import ")) and "#" not in source[i]:
        i -= 1
    return i >= 0 and "#" in source[i]


def test_function_local_imports_say_why():
    """A function-local import of the package's own modules keeps an extra or ``--help`` light: a comment
    on its line, or above its run of imports, says so."""
    unexplained = []
    for name, path in package_modules().items():
        source = path.read_text().splitlines()
        for names, line, local in imports_of(name, path):
            if not local or not any(n.startswith("rwkvkit") for n in names):
                continue
            if not _has_reason(source, line):
                unexplained.append(f"{path.relative_to(PACKAGE_DIR.parent)}:{line}")
    assert not unexplained, "function-local imports without a reason: " + ", ".join(unexplained)
