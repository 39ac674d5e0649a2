"""The package's shape: no import circle among its modules (scripts/import_cycles.py walks
every import, function-local ones included)."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("import_cycles",
                                                  ROOT / "scripts" / "import_cycles.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_import_circles():
    tool = _tool()
    graph = tool.import_graph(ROOT / "nanodiffusion")
    assert len(graph) > 40 and graph["nanodiffusion.loading"]  # the walk sees the imports
    assert tool.cycles(graph) == []


def test_the_walk_finds_a_circle(tmp_path):
    tool = _tool()
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import x\n")  # function-local: counted
    assert tool.cycles(tool.import_graph(pkg)) == [["pkg.a", "pkg.b"]]
