"""The project's import graph: no circles, and ``conversion/`` never imports the plugin or vLLM.

Every module of ``conversion/`` and ``vllm_mha2mla/`` is parsed with ``ast`` (nothing is
imported), and every import statement counts, at module level or inside a function: a
function-level import hides a circle from Python, not from this test. ``from pkg import sub``
is an arrow to the submodule ``pkg.sub`` (not to ``pkg/__init__.py``, which Python runs first
for any submodule); ``from pkg import name`` is an arrow to ``pkg``.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("conversion", "vllm_mha2mla")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imported_names(path: Path, module: str, modules: dict[str, Path] | frozenset[str]) -> set[str]:
    """The module names the import statements of ``path`` load: ``import a.b`` gives ``a.b``;
    ``from a import b`` gives ``a.b`` where that is a project module, else ``a``."""
    is_package = path.name == "__init__.py"
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                names.add(sub if sub in modules else target)
    return names


@functools.lru_cache(maxsize=1)
def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(project-internal edges, all imported top-level names) per module."""
    modules = project_modules()
    edges: dict[str, set[str]] = {}
    external: dict[str, set[str]] = {}
    for module, path in modules.items():
        names = imported_names(path, module, modules)
        # every name is a module (``import`` names modules, ``from`` names its module or a submodule);
        # one that does not exist (any more) still counts as an arrow
        edges[module] = {n for n in names if n.split(".")[0] in PACKAGES and n != module}
        external[module] = {n.split(".")[0] for n in names if n}
    return edges, external


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue
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
                components.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return components


def test_the_import_graph_has_no_cycles():
    edges, _ = import_graph()
    cycles = find_cycles(edges)
    assert not cycles, "import circles (each line one set of modules that import each other):\n" + "\n".join(
        " <-> ".join(c) for c in cycles)


def test_conversion_never_imports_the_plugin_or_vllm():
    edges, external = import_graph()
    upward = sorted((m, t) for m, targets in edges.items() if m.startswith("conversion")
                    for t in targets if t.split(".")[0] == "vllm_mha2mla")
    assert not upward, f"conversion/ imports the plugin: {sorted(upward)}"
    vllm_users = sorted(m for m, names in external.items() if m.startswith("conversion") and "vllm" in names)
    assert not vllm_users, f"conversion/ imports vLLM: {vllm_users}"


def test_the_checker_sees_function_level_and_relative_imports_and_cycles(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text("import os\n\ndef f():\n    from conversion.plan import DTYPES\n    from . import sibling\n")
    assert imported_names(source, "pkg.sub.mod", frozenset({"pkg.sub.sibling"})) == {
        "os", "conversion.plan", "pkg.sub.sibling"}
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
