"""Print segx's module map and internal import edges (incl. deferred imports)."""

import ast
import collections
import pathlib
import sys

root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "segx")
mods = {}
for p in sorted(root.rglob("*.py")):
    rel = p.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    mods[".".join(parts)] = p
edges = collections.defaultdict(set)
for m, p in mods.items():
    tree = ast.parse(p.read_text())
    pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
    for n in ast.walk(tree):
        targets = []
        if isinstance(n, ast.Import):
            targets = [a.name for a in n.names]
        elif isinstance(n, ast.ImportFrom):
            if n.level:
                base = pkg.split(".")
                base = base[: len(base) - (n.level - 1)]
                mod = ".".join(base + ([n.module] if n.module else []))
            else:
                mod = n.module or ""
            subs = [mod + "." + a.name for a in n.names if mod + "." + a.name in mods]
            targets = subs if len(subs) == len(n.names) else [mod] + subs
        for t in targets:
            if t in mods and t != m:
                edges[m].add((t, n.lineno))
for m in mods:
    for t, ln in sorted(edges[m]):
        print(f"{m}:{ln} -> {t}")
