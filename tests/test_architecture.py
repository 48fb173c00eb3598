"""The package's shape, checked from its source: no import cycle, imports only in the pipeline's direction
(core <- train <- export <- compile <- runtime), and no source file grown past a few hundred lines.

Every import counts, also one inside a function or under `if TYPE_CHECKING`: a late import that dodges a cycle is
still a cycle. Test modules and test support are left out (a test may reach across stages).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"plateau": "plateau", "train": "plateau.train", "export": "plateau.export",
           "compile": "plateau.compile", "runtime": "plateau.runtime"}
ORDER = ["plateau", "plateau.train", "plateau.export", "plateau.compile", "plateau.runtime"]
MAX_LINES = 450


def _is_test(path: Path) -> bool:
    return path.name.startswith("test_") or path.name == "conftest.py"


def _modules() -> dict[str, Path]:
    mods = {}
    for folder, pkg in FOLDERS.items():
        for f in (ROOT / folder).rglob("*.py"):
            if _is_test(f):
                continue
            rel = f.relative_to(ROOT / folder).with_suffix("")
            mods[".".join([pkg, *rel.parts]).removesuffix(".__init__")] = f
    return mods


def _stage(module: str) -> str:
    return max((s for s in ORDER if module == s or module.startswith(s + ".")), key=len)


def _imports(module: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The package modules `module` imports (a `from pkg import name` counts pkg.name when that is a module)."""
    pkg = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in mods:
                name = name.rpartition(".")[0]
            # a module importing its own package's __init__ (for a sibling) is no dependency on itself
            if name and name != module and not module.startswith(name + "."):
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, mods) for m, p in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_imports_follow_the_pipeline():
    upstream = sorted(f"{m} -> {t}" for m, ts in _graph().items() for t in ts
                      if ORDER.index(_stage(t)) > ORDER.index(_stage(m)))
    assert upstream == []


def test_cycle_finder_finds_a_cycle():
    """The check above would see one: a -> b -> c -> a, with d hanging off it."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_source_file_over_the_limit():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in _modules().values()}
    assert {k: v for k, v in sizes.items() if v > MAX_LINES} == {}
