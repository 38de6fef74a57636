"""The figures of issue 28 for one source tree: dict access to the ensemble record, tests of
"which kind of task is this" (binary, several classes, regions) outside the task modules,
functions over 100 lines, functions of 8 or more parameters, and the largest modules.

    python experiments/layout/seams.py segx > experiments/layout/seams_after.md
    git archive <commit> segx | tar -x -C /tmp/old && python experiments/layout/seams.py /tmp/old/segx

Standard library only. A "kind test" is a line that asks whether labels, classes, names or
regions are None or set (``labels is None``, ``if regions``, ``labels.regions``,
``.classes is not None``): the question every seam asked before the task object answered it.
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


def kind_tests(root: Path) -> Counter:
    counts: Counter = Counter()
    for path in sorted(root.rglob("*.py")):
        rel = str(path.relative_to(root))
        for line in path.read_text().splitlines():
            code = line.split("#", 1)[0]
            if KIND_TEST.search(code):
                counts[rel] += 1
    return counts


def record_access(root: Path) -> tuple[int, int]:
    outside = [p for p in root.rglob("*.py") if not str(p).endswith("ensembling/record.py")]
    text = "\n".join(p.read_text() for p in outside)
    return text.count('record["'), text.count('record.get("')


def main(root: Path) -> None:
    funcs = functions(root)
    kinds = kind_tests(root)
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
    print(f"| functions over 100 lines | {len(long)} |")
    print(f"| functions of 8 or more parameters | {len(many)} |")
    print(f"| longest function (lines) | {max(f[2] for f in funcs)} |")
    print("\n## Kind tests per module\n\n| module | lines |\n|---|---:|")
    for rel, n in kinds.most_common():
        print(f"| {rel} | {n} |")
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
