import sys, subprocess, collections
edges = [l.split(" -> ") for l in open(sys.argv[1]).read().splitlines()]
g = collections.defaultdict(set)
for a, b in edges:
    a = a.split(":")[0]
    g[a].add(b)
# module-level cycles (SCCs of size > 1)
index, low, on, stack, sccs, i = {}, {}, set(), [], [], [0]
sys.setrecursionlimit(10000)
def strong(v):
    index[v] = low[v] = i[0]; i[0] += 1; stack.append(v); on.add(v)
    for w in g.get(v, ()):
        if w not in index:
            strong(w); low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop(); on.discard(w); comp.append(w)
            if w == v: break
        if len(comp) > 1: sccs.append(sorted(comp))
for v in list(g):
    if v not in index: strong(v)
for c in sccs: print("cycle:", " <-> ".join(c))
print(len(sccs), "module cycles")
