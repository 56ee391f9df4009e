"""The dependency rule of DESIGN.md, checked on the code: `store/` never imports torch, transformers or TRL, and
neither does `dashboard/` (plugin → store, dashboard → store; only the plugin and the demo touch the model)."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import forkwatch.dashboard
import forkwatch.store
import pytest

HEAVY = ("torch", "transformers", "trl")
FORBIDDEN = HEAVY + ("forkwatch.plugin", "forkwatch.demo")
LAYERS = [forkwatch.store, forkwatch.dashboard]


def _is_page_script(name: str) -> bool:
    return name.startswith("page_")  # Streamlit runs these as scripts: importing one draws the page


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", LAYERS, ids=["store", "dashboard"])
def test_no_module_of_the_layer_imports_model_code_directly(package):
    files = sorted(Path(package.__path__[0]).glob("*.py"))
    assert len(files) > 3
    for f in files:
        bad = {m for m in _imports(f) if any(m == x or m.startswith(x + ".") for x in FORBIDDEN)}
        assert not bad, f"{f.name} imports {sorted(bad)}"


@pytest.mark.parametrize("package", LAYERS, ids=["store", "dashboard"])
def test_importing_the_layer_loads_no_model_library(package):
    modules = [f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__)
               if not _is_page_script(m.name)]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"heavy = sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))\n"
        "sys.exit(f'imported {heavy}' if heavy else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
