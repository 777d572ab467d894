"""The package's shape, checked: no import cycles (imports inside functions count), no module over
400 lines, no private name imported across modules, a README that stays short.

The layer order itself is import-linter's job (``lint-imports``, contracts in pyproject.toml); a cycle
inside one layer is this file's.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bake", "lineas")
MAX_MODULE_LINES = 400
MAX_README_LINES = 300


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            out[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return out


def _resolve(name: str, mods) -> str | None:
    while name:
        if name in mods:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(mods) -> dict[str, set[tuple[str, str]]]:
    """module -> {(imported module, imported name or "")}, every import statement in the file."""
    out: dict[str, set[tuple[str, str]]] = {}
    for mod, (f, is_pkg) in mods.items():
        found = out.setdefault(mod, set())
        package = mod if is_pkg else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update((t, "") for a in node.names if (t := _resolve(a.name, mods)))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([node.module] if node.module else []))
                for a in node.names:
                    full = f"{base}.{a.name}"
                    if full in mods:
                        found.add((full, ""))
                    elif (t := _resolve(base, mods)) is not None:
                        found.add((t, a.name))
    return out


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(root):
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    """The check below can fail: a two-module cycle and a three-module one are found, a chain is not."""
    edges = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
    assert sorted(_cycles(edges)) == [["a", "b"], ["c", "d", "e"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_counting_imports_inside_functions():
    mods = _modules()
    edges = {m: {t for t, _ in found if t != m} for m, found in _imports(mods).items()}
    assert _cycles(edges) == []


def test_no_private_name_crosses_a_module_boundary():
    mods = _modules()
    crossing = sorted(f"{m} imports {name} from {t}" for m, found in _imports(mods).items()
                      for t, name in found if name.startswith("_") and not name.startswith("__") and t != m)
    assert crossing == []


@pytest.mark.parametrize("pkg", PACKAGES)
def test_modules_stay_under_400_lines(pkg):
    long = {str(f.relative_to(ROOT)): n for f in (ROOT / pkg).rglob("*.py")
            if (n := len(f.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def test_readme_stays_short():
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; the rest belongs in docs/"
