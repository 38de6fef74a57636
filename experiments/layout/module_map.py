"""A table of the package's modules: path, lines, the first paragraph of its docstring."""

import ast
import pathlib
import sys

root = pathlib.Path(sys.argv[1])
for p in sorted(root.rglob("*.py")):
    rel = p.relative_to(root.parent)
    try:
        doc = ast.get_docstring(ast.parse(p.read_text())) or ""
    except SyntaxError:
        doc = ""
    first = " ".join(doc.split("\n\n")[0].split())[:110]
    print(f"| {rel} | {len(p.read_text().splitlines())} | {first} |")
