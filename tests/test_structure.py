"""The package's shape: no import circle among its modules (scripts/import_cycles.py walks
every import, function-local ones included); the command line's parser without torch."""
import importlib.util
import os
import subprocess
import sys
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


def test_the_cli_parser_imports_no_torch_and_every_command_has_a_handler():
    """`nanodiffusion --help` and argument errors answer without importing torch: cli.py
    builds the parser, and its command modules import the heavy parts inside the commands."""
    code = ("import sys; from nanodiffusion import cli, cli_images, cli_models; cli._parser(); "
            "sys.exit('torch' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT)
    from nanodiffusion import cli, cli_images, cli_models

    commands = cli._parser()._subparsers._group_actions[0].choices  # name -> subparser
    for name in commands:
        module = cli_models if name in cli.MODEL_COMMANDS else cli_images
        assert name in module.HANDLERS, name
    assert set(commands) == set(cli_images.HANDLERS) | set(cli_models.HANDLERS)
