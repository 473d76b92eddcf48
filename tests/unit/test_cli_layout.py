"""The CLI's layout (issue 11): command modules import their options and helpers from bucketer/options.py and
register on bucketer/app.py's app, never importing bucketer/cli.py (no cycle); each shared option is declared once."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "bucketer"
SHARED = (
    "--bootstrap",
    "--kafka-config",
    "--kafka-option",
    "--topic-prefix",
    "--data-dir",
    "--until-idle",
    "--at-least-once",
)


def imported_modules(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_no_module_but_the_entry_point_imports_bucketer_cli() -> None:
    importers = sorted(p.name for p in PACKAGE.glob("*.py") if "bucketer.cli" in imported_modules(p))
    assert importers == ["__main__.py"]


def test_shared_options_are_declared_only_in_options_py() -> None:
    for path in PACKAGE.glob("*.py"):
        if path.name in ("options.py", "demo.py"):  # demo.py runs the CLI: its flags are arguments, not declarations
            continue
        literals = {n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant)}
        assert not literals & {*SHARED, "--buckets", "--group"}, f"{path.name} declares {literals & {*SHARED}}"


def test_a_command_module_imported_alone_registers_on_the_shared_app() -> None:
    """No cycle: importing a command module first (before bucketer.cli) works and registers its commands."""
    code = (
        "import bucketer.cli_ops, sys\n"
        "from bucketer.app import app\n"
        "assert 'bucketer.cli' not in sys.modules\n"
        "print(sorted(c.name for c in app.registered_commands))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "['bootstrap', 'rebucket']"
