"""The import circles inside the nanodiffusion package: every `import`/`from` of one of its
modules by another (at the top of a file or inside a function: a function-local import that
dodges a circle is still one), and the groups of modules that reach each other. Exit 1 when
there is a circle.

    python scripts/import_cycles.py [--package nanodiffusion]
"""
import argparse
import ast
import sys
from pathlib import Path


def module_name(path, root):
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path, name, modules):
    """The package's modules `name` (the module at `path`) imports."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def import_graph(root):
    """module -> the package's modules it imports, for the package folder `root`."""
    paths = {module_name(p, root): p for p in root.rglob("*.py")}
    graph = {name: imports(p, name, paths) for name, p in paths.items()}
    # a module's own packages are imported before it runs ("from . import x" reads a module,
    # not the package's __init__ again): such an edge closes no circle
    return {name: {m for m in deps if not name.startswith(m + ".")}
            for name, deps in graph.items()}


def cycles(graph):
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))
    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--package", default=str(Path(__file__).parents[1] / "nanodiffusion"))
    graph = import_graph(Path(ap.parse_args().package))
    found = cycles(graph)
    for group in found:
        print("circle: " + " <-> ".join(group))
    print(f"{len(found)} import circle(s) among {len(graph)} modules")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
