"""The architecture contracts hold: layers, no cycle, the loop imported only by its entry points (pyproject.toml's
[tool.importlinter], checked by import-linter), and neither the sparse core nor the models reach torch.distributed
(import-linter cannot forbid a subpackage of an external package, so that one is read from the source here)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_import_contracts_hold() -> None:
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint is not None, "import-linter is part of the test extras: pip install -e '.[test]'"
    result = subprocess.run([lint], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "0 broken" in result.stdout


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("package", ["sparse", "models"])
def test_the_sparse_core_and_the_models_never_import_torch_distributed(package: str) -> None:
    for path in sorted((ROOT / "sgtrain" / package).rglob("*.py")):
        bad = {
            name
            for name in _imported_modules(path)
            if name.startswith(("torch.distributed", "accelerate", "deepspeed"))
        }
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
