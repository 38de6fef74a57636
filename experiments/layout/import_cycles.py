"""Module import cycles (strongly connected components) in an edge list from import_edges.py."""

import collections
import sys


def main(path: str) -> None:
    graph = collections.defaultdict(set)
    for line in open(path).read().splitlines():
        source, target = line.split(" -> ")
        graph[source.split(":")[0]].add(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                cycles.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in list(graph):
        if v not in index:
            visit(v)
    for cycle in cycles:
        print("cycle:", " <-> ".join(cycle))
    print(len(cycles), "module cycles")


if __name__ == "__main__":
    main(sys.argv[1])
