"""The kernel package's imports, read from its source with ``ast`` (nothing is imported): no
import loop between its modules, and none that runs back up a floor (encdec_kernels is the lowest:
it never imports encdec_models or encdec_cli). Imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "encdec_kernels"
ROOT = Path(__file__).resolve().parents[1]
HIGHER_FLOORS = ("encdec_models", "encdec_cli")


def _modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the package (``encdec_kernels`` is its __init__)."""
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imported(name: str, path: Path, modules=()) -> set[str]:
    """Every module ``name`` (the module at ``path``) imports, absolute, anywhere in it: for
    ``from pkg import x``, pkg.x if that is one of ``modules``, else pkg."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (edges inside the package only)."""
    modules = _modules()
    return {
        name: (_imported(name, path, modules) & modules.keys()) - {name} for name, path in modules.items()
    }


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import loop as a path (first module repeated at the end), or None."""
    state: dict[str, str] = {}  # "open" while on the DFS stack, "done" after

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [node, nxt]
            if nxt not in state and (found := visit(nxt, stack + [node])):
                return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [])):
            return found
    return None


def test_reads_every_kernel_module():
    graph = _graph()
    assert {"encdec_kernels", "encdec_kernels.common", "encdec_kernels.gluon_support"} <= graph.keys()
    # the Hopper kernels build on the shared modules (so a loop through them would show here)
    assert "encdec_kernels.common" in graph["encdec_kernels.flash_hopper"]
    assert "encdec_kernels.gluon_support" in graph["encdec_kernels.shared_kv_hopper"]


def test_kernel_modules_import_no_loop():
    graph = _graph()
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_cycle_finder_finds_a_loop():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_kernels_never_import_a_higher_floor():
    bad = {
        name: sorted(m for m in _imported(name, path) if m.split(".")[0] in HIGHER_FLOORS)
        for name, path in _modules().items()
    }
    assert not {name: found for name, found in bad.items() if found}
