"""The package's layout: stages of the data flow, no import cycles, deferred imports explained.

Read from the source with ``ast`` (nothing is imported), so a cycle hidden in a function body
or behind ``if TYPE_CHECKING:`` counts as much as one at the top of a module.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "xfrmtrace"

#: Stages in data-flow order; a module may import its own stage and lower ones only.
#: ``xfrmtrace`` itself and ``errors`` are below every stage; ``session`` (the pipeline that
#: wires the stages together), ``cli``, ``__main__`` and ``native`` (which libcapstone the
#: command loads, before any stage imports capstone) are above all of them.
STAGES = ("bpf", "kernel", "resolve", "trace", "decode", "context", "output", "report")
FOUNDATION = ("xfrmtrace", "xfrmtrace.errors")
TOP = ("xfrmtrace.session", "xfrmtrace.cli", "xfrmtrace.__main__", "xfrmtrace.native")
#: Why an import may be deferred into a function: it must say so in a comment.
DEFERRED_COMMENT = re.compile(r"#\s*deferred:\s*\S")


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int
    deferred: bool  # inside a function or class body


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _target(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str, path: Path, known: dict[str, Path]) -> list[Import]:
    """Every xfrmtrace import of a module, at any depth."""
    tree = ast.parse(path.read_text(), str(path))
    found: list[Import] = []

    def visit(node: ast.AST, deferred: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = deferred or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                   ast.ClassDef))
            if isinstance(child, ast.Import):
                targets = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                module = _target(child, name, path.name == "__init__.py")
                # ``from pkg import mod`` imports the module pkg.mod when there is one.
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module
                           for a in child.names]
            else:
                visit(child, inner)
                continue
            for target in targets:
                if target.split(".")[0] == "xfrmtrace":
                    found.append(Import(name, target, child.lineno, deferred))
    visit(tree, False)
    return found


def all_imports() -> list[Import]:
    known = modules()
    return [imp for name, path in known.items() for imp in imports_of(name, path, known)]


def stage(module: str) -> int:
    """-1 for the foundation, len(STAGES) for the top, else the stage's index."""
    if module in FOUNDATION:
        return -1
    if module in TOP:
        return len(STAGES)
    parts = module.split(".")
    if len(parts) < 2 or parts[1] not in STAGES:
        raise AssertionError(f"{module} belongs to no stage: put it in a subpackage of "
                             f"{', '.join(STAGES)}, or list it in FOUNDATION or TOP")
    return STAGES.index(parts[1])


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` (as a path that returns to its start), or []."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for succ in sorted(graph.get(node, ())):
            if state.get(succ) == 1:
                return stack[stack.index(succ):] + [succ]
            if succ not in state:
                cycle = visit(succ)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def test_every_module_belongs_to_a_stage() -> None:
    for name in modules():
        stage(name)


def test_no_import_goes_from_a_lower_stage_to_a_higher_one() -> None:
    wrong = [f"{imp.importer}:{imp.line} imports {imp.imported}" for imp in all_imports()
             if stage(imp.imported) > stage(imp.importer)]
    assert not wrong, "stage order " + " < ".join(STAGES) + " broken:\n" + "\n".join(wrong)


def test_no_import_cycles_even_deferred_ones() -> None:
    known = modules()
    graph: dict[str, set[str]] = {name: set() for name in known}
    for imp in all_imports():
        if imp.imported in known and imp.imported != imp.importer:
            graph[imp.importer].add(imp.imported)
    cycle = find_cycle(graph)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_every_deferred_import_says_why() -> None:
    """An import inside a function is there to keep start-up fast (or an optional
    dependency out of the way): a ``# deferred: <why>`` comment on its line or on the
    comment lines right above it."""
    missing = []
    for name, path in modules().items():
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    continue
                above = []
                i = node.lineno - 2
                while i >= 0 and (lines[i].strip().startswith("#")
                                  or re.match(r"\s*(from|import) ", lines[i])):
                    above.append(lines[i])
                    i -= 1
                own = lines[node.lineno - 1:(node.end_lineno or node.lineno)]
                if not any(DEFERRED_COMMENT.search(text) for text in own + above):
                    missing.append(f"{name}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not missing, "deferred imports without '# deferred: why':\n" + "\n".join(missing)


def test_readme_layout_lists_every_subpackage() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`src/xfrmtrace/(\w+)/`", section))
    actual = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert listed == actual, f"README Layout lists {sorted(listed)}, the tree has {sorted(actual)}"
    order = [s for s in re.findall(r"`src/xfrmtrace/(\w+)/`", section) if s in STAGES]
    assert order == list(STAGES), "README Layout lists the stages out of data-flow order"


# --- the checks themselves must be able to fail ----------------------------------------------


def test_find_cycle_finds_a_deferred_cycle_and_accepts_a_tree() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_a_function_level_import_is_seen(tmp_path: Path) -> None:
    low = tmp_path / "low.py"
    low.write_text("def f():\n    from xfrmtrace.output import text\n")
    found = imports_of("xfrmtrace.kernel.low", low, {})
    assert found == [Import("xfrmtrace.kernel.low", "xfrmtrace.output", 2, True)]
    assert stage("xfrmtrace.output.text") > stage("xfrmtrace.kernel.low")
