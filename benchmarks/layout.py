"""Print the module's shape: lines per section, the core's size, the longest functions, and
names the core uses long before it defines them (issue #23's acceptance figures).

    python benchmarks/layout.py [path/to/flask_executor.py]

Sections start at lines "# -- N. Title ---". The core is every section before the first
whose number is 7 or more (the optional tails). A forward reference is a top-level name
read (not in an annotation) more than 150 lines before the line that defines it; only
those whose use and definition both lie in the core count against the budget.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

BUDGET, CORE_BUDGET, FUNCTION_BUDGET, REACH = 1300, 800, 40, 150


def sections(lines: list[str]) -> list[tuple[str, int, int]]:
    """(title, first line, last line) of each section, the preamble first (1-based)."""
    starts = [(i + 1, m.group(1)) for i, line in enumerate(lines)
              if (m := re.match(r"# -- (\d+[a-z]?\..*?) -*$", line))]  # fmt: skip
    bounds = [(1, "0. preamble: docstring, imports, __all__"), *starts]
    ends = [start - 1 for start, _ in bounds[1:]] + [len(lines)]
    return [(title, start, end) for (start, title), end in zip(bounds, ends, strict=True)]


def definitions(tree: ast.Module) -> dict[str, int]:
    """Top-level names and the line that first binds each."""
    names: dict[str, int] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.setdefault(node.name, node.lineno)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        names.setdefault(name.id, node.lineno)
    return names


def annotation_nodes(tree: ast.Module) -> set[int]:
    """ids of every node inside an annotation (not run: the module uses PEP 563)."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        notes: list[ast.AST | None] = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            arguments = node.args
            every = [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs,
                     arguments.vararg, arguments.kwarg]  # fmt: skip
            notes += [a.annotation for a in every if a is not None] + [node.returns]
        elif isinstance(node, ast.AnnAssign):
            notes.append(node.annotation)
        for note in notes:
            if note is not None:
                inside.update(id(sub) for sub in ast.walk(note))
    return inside


def main(path: str) -> int:
    source = Path(path).read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    parts = sections(lines)
    tails = [start for title, start, _ in parts if int(re.match(r"\d+", title)[0]) >= 7]
    core_end = (tails[0] - 1) if tails else len(lines)
    print(f"{path}: {len(lines)} lines (budget {BUDGET})")
    for title, start, end in parts:
        print(f"  {end - start + 1:5}  lines {start:>4}-{end:<4}  {title}")
    print(f"core (sections 0-6): {core_end} lines (budget {CORE_BUDGET})")
    functions = sorted(
        ((n.end_lineno or n.lineno) - n.lineno + 1, n.name, n.lineno)
        for n in ast.walk(tree)
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
    )
    longest = ", ".join(f"{name} {size} (line {line})" for size, name, line in functions[-3:])
    print(f"longest functions (budget {FUNCTION_BUDGET}): {longest}")
    over = [name for size, name, _ in functions if size > FUNCTION_BUDGET]
    print(f"functions over {FUNCTION_BUDGET} lines: {len(over)} {over or ''}")
    defined, skip = definitions(tree), annotation_nodes(tree)
    far: dict[tuple[str, int], int] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and id(node) not in skip:
            at = defined.get(node.id)
            if at is not None and at - node.lineno > REACH:
                key = (node.id, at)
                far[key] = min(far.get(key, node.lineno), node.lineno)
    in_core = {k: v for k, v in far.items() if k[1] <= core_end}
    print(f"names used over {REACH} lines before their definition: {len(far)} "
          f"({len(in_core)} inside the core)")  # fmt: skip
    for (name, at), first in sorted(in_core.items(), key=lambda item: item[1]):
        print(f"  core: {name} used at {first}, defined at {at}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "flask_executor.py"))
