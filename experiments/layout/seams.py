"""The figures of issue 28 for one source tree: dict access to the ensemble record, tests of
"which kind of task is this" (binary, several classes, regions) outside the task modules,
functions over 100 lines, functions of 8 or more parameters, and the largest modules.

    python experiments/layout/seams.py segx > experiments/layout/seams_after.md
    git archive <commit> segx | tar -x -C /tmp/old && python experiments/layout/seams.py /tmp/old/segx

Standard library only. A "kind test" is a line that asks whether labels, classes, names or
regions are None or set (``labels is None``, ``if regions``, ``labels.regions``,
``.classes is not None``): the question every seam asked before the task object answered it.
Presence (None carried through, an optional field written where it is set) is counted apart.
"""

from __future__ import annotations

import ast
import re
import sys
from collections import Counter
from pathlib import Path

# The modules whose job is to know the kinds: the task objects, and the labels they are built from.
TASK_MODULES = ("ensembling/task.py", "data/labels.py")
KIND_TEST = re.compile(
    r"\b(labels|classes|names|regions|record_labels)\s+is\s+(not\s+)?None"
    r"|\bif\s+(not\s+)?[\w.]*\b(regions|classes)\b\s*(:|else|and|or|$)"
    r"|\b(labels|self\.labels|record\.labels)\.regions\b"
    r"|\.(classes|regions)\s+is\s+(not\s+)?None"
)
# Presence, not a kind: a value carried as it is, whatever the kind. Two forms are not counted (the
# line still is when something else on it asks the kind): None carried through,
# ``None if labels is None else f(labels)`` (absent stays absent, nothing is chosen by kind); and an
# optional field written under its own name where it is set, ``{"labels": x} if labels is not None
# else {}`` or ``if self.labels is not None:`` with ``out["labels"] = ...`` on the next line, as
# every optional JSON field is written (flip_swap, precision). A fourth kind touches neither.
NONE_CARRIED = re.compile(r"\bNone\s+if\s+[\w.]+\s+is\s+None\s+else\b")
SET_FIELD = re.compile(r"\b(?:[\w.]*\.)?(\w+)\s+is\s+not\s+None\b")


def functions(root: Path) -> list[tuple[str, str, int, int]]:
    """(file, function, lines, parameters) of every function; ``self``/``cls`` not counted."""
    out = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                n = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)
                if a.args and a.args[0].arg in ("self", "cls"):
                    n -= 1
                out.append((str(path.relative_to(root)), node.name, node.end_lineno - node.lineno + 1, n))
    return out


def presence(code: str, next_code: str) -> str:
    """``code`` without the presence tests on it (see NONE_CARRIED and SET_FIELD)."""
    code = NONE_CARRIED.sub("None if _ else", code)
    for m in reversed(list(SET_FIELD.finditer(code))):
        key = re.compile(rf"[\"']{m.group(1)}[\"']\s*(\]\s*=[^=]|:)")
        if key.search(code) or (code.rstrip().endswith(":") and key.search(next_code)):
            code = code[: m.start()] + "_" + code[m.end() :]
    return code


def kind_tests(root: Path) -> tuple[Counter, list[tuple[str, int, str]]]:
    """Kind tests per module, and the lines left out as presence (module, line number, code)."""
    counts: Counter = Counter()
    carried = []
    for path in sorted(root.rglob("*.py")):
        rel = str(path.relative_to(root))
        lines = [line.split("#", 1)[0] for line in path.read_text().splitlines()] + [""]
        for number, (code, next_code) in enumerate(zip(lines[:-1], lines[1:], strict=True), start=1):
            if KIND_TEST.search(code):
                if KIND_TEST.search(presence(code, next_code)):
                    counts[rel] += 1
                else:
                    carried.append((rel, number, code.strip()))
    return counts, carried


def record_access(root: Path) -> tuple[int, int]:
    outside = [p for p in root.rglob("*.py") if not str(p).endswith("ensembling/record.py")]
    text = "\n".join(p.read_text() for p in outside)
    return text.count('record["'), text.count('record.get("')


def main(root: Path) -> None:
    funcs = functions(root)
    kinds, carried = kind_tests(root)
    in_task = sum(v for k, v in kinds.items() if k in TASK_MODULES)
    long = sorted((f for f in funcs if f[2] > 100), key=lambda f: -f[2])
    many = sorted((f for f in funcs if f[3] >= 8), key=lambda f: -f[3])
    sizes = sorted(
        ((len(p.read_text().splitlines()), str(p.relative_to(root))) for p in root.rglob("*.py")), reverse=True
    )
    brackets, gets = record_access(root)
    print(f"# Seams of `{root}`\n")
    print("| figure | value |\n|---|---:|")
    print(f'| `record["` outside ensembling/record.py | {brackets} |')
    print(f'| `record.get("` outside ensembling/record.py | {gets} |')
    print(f"| kind tests, all modules | {sum(kinds.values())} |")
    print(f"| kind tests in the task modules ({', '.join(TASK_MODULES)}) | {in_task} |")
    print(f"| kind tests outside them | {sum(kinds.values()) - in_task} |")
    print(f"| presence tests (None carried, optional field written when set), not counted | {len(carried)} |")
    print(f"| functions over 100 lines | {len(long)} |")
    print(f"| functions of 8 or more parameters | {len(many)} |")
    print(f"| longest function (lines) | {max(f[2] for f in funcs)} |")
    print("\n## Kind tests per module\n\n| module | lines |\n|---|---:|")
    for rel, n in kinds.most_common():
        print(f"| {rel} | {n} |")
    print("\n## Presence tests (not counted)\n\n| line | code |\n|---|---|")
    for rel, number, code in carried:
        print(f"| {rel}:{number} | `{code}` |")
    print("\n## Functions over 100 lines\n\n| function | lines | parameters |\n|---|---:|---:|")
    for rel, name, lines, n in long:
        print(f"| {rel}:{name} | {lines} | {n} |")
    print("\n## Functions of 8 or more parameters\n\n| function | lines | parameters |\n|---|---:|---:|")
    for rel, name, lines, n in many:
        print(f"| {rel}:{name} | {lines} | {n} |")
    print("\n## The 10 largest modules\n\n| module | lines |\n|---|---:|")
    for lines, rel in sizes[:10]:
        print(f"| {rel} | {lines} |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "segx"))
