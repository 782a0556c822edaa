"""The rules between lm/'s folders (pyproject.toml's [tool.importlinter] contracts) and its module size."""

import os
import re
import subprocess
import sys

import pytest

from lm import PROJECT_ROOT

MAX_MODULE_LINES = 350

# lint-imports finds `lm` on sys.path; an editable install of another checkout could answer first,
# so this one goes in front (lint-imports puts the working directory there too) and is checked.
LINT_IMPORTS = """
import importlib.util, sys
from pathlib import Path
origin = Path(importlib.util.find_spec("lm").origin).resolve()
if not origin.is_relative_to(Path.cwd().resolve()):
    sys.exit(f"lint-imports would analyse {origin}, not this checkout's lm/")
from importlinter.cli import lint_imports_command
options = ["--no-cache"]  # no .import_linter_cache/ in the checkout
if any("--no-logo" in parameter.opts for parameter in lint_imports_command.params):  # import-linter 2.7+
    options.append("--no-logo")
lint_imports_command(options)
"""


def test_the_import_contracts_hold():
    pytest.importorskip("importlinter", reason="the import rules need the dev extra's import-linter")
    path = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "NO_COLOR": "1", "COLUMNS": "120"}
    result = subprocess.run(
        [sys.executable, "-c", LINT_IMPORTS],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, (
        "an import breaks the rules between lm/'s folders (pyproject.toml, [tool.importlinter]):\n"
        f"{result.stdout}{result.stderr}"
    )
    kept = re.search(r"Contracts: (\d+) kept, 0 broken", result.stdout)
    assert kept and int(kept[1]) > 0, f"no contract was checked:\n{result.stdout}"


def test_no_module_is_longer_than_the_limit():
    lengths = {
        path.relative_to(PROJECT_ROOT).as_posix(): len(path.read_text(encoding="utf-8").splitlines())
        for path in sorted((PROJECT_ROOT / "lm").rglob("*.py"))
    }
    assert lengths, "no module found under lm/"
    too_long = {path: lines for path, lines in lengths.items() if lines > MAX_MODULE_LINES}
    assert not too_long, f"modules over {MAX_MODULE_LINES} lines, to split: {too_long}"
