"""The layering, checked on the code: `store/` never imports torch, transformers or TRL, and neither does
`dashboard/` (plugin → store, dashboard → store; only the plugin and the demo touch the model); only the CLI writes
to the terminal; one background thread and one queue carry records from the plugin to the disk; the plugin (which
runs on the training thread) draws no progress bar and writes no file except the checkpoint's own; the torch layer
of the plugin does not know Arrow types."""

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
    modules = [f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__)]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"heavy = sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))\n"
        "sys.exit(f'imported {heavy}' if heavy else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


ROOT = Path(forkwatch.store.__path__[0]).parent
LIBRARY = ("store", "plugin", "dashboard")  # library code: returns values and logs; the CLI prints


def _calls(path: Path) -> list[str]:
    """Dotted names of every call (`print`, `threading.Thread`, `sys.stdout.write`, ...) in a file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            out.append(ast.unparse(node.func))
    return out


@pytest.mark.parametrize("folder", LIBRARY)
def test_only_the_cli_writes_to_the_terminal(folder):
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files
    for f in files:
        bad = [c for c in _calls(f) if c == "print" or c.startswith(("sys.stdout", "sys.stderr"))]
        assert not bad, f"{folder}/{f.name} writes to the terminal: {bad}"


def test_one_background_thread_and_one_queue_from_the_plugin_to_the_disk():
    threads, queues = [], []
    for folder in ("store", "plugin"):
        for f in sorted((ROOT / folder).rglob("*.py")):
            calls = _calls(f)
            threads += [f"{folder}/{f.name}" for c in calls if c in ("threading.Thread", "Thread")]
            queues += [f"{folder}/{f.name}" for c in calls if c.startswith("queue.")]
    assert threads == ["store/writer.py"] and queues == ["store/writer.py"]


PROGRESS = ("tqdm", "rich", "progress")
# plugin/ runs on the training thread: its files on disk are written by the writer thread (store/), except what a
# checkpoint must hold at the moment TRL saves it (the run id a resume continues, the selector's generator state)


def _writes(path: Path) -> list[str]:
    """Every call that writes a file: open() with a mode holding w/a/x/+, json.dump / torch.save / np.save /
    pq.write_table and the like, Path.write_text/write_bytes."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        if name == "open" or name.endswith(".open"):
            mode = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"),
                                                                 None)
            text = mode.value if isinstance(mode, ast.Constant) else "r" if mode is None else "?"
            if not isinstance(text, str) or set(text) & set("wax+?"):
                found.append(f"{name}(mode={text!r})")
        elif name.split(".")[-1] in ("dump", "save", "savez", "write_table", "write_text", "write_bytes", "to_parquet",
                                     "rename", "replace", "makedirs", "mkdir"):
            found.append(name)
    return found


def test_the_plugin_writes_no_file_on_the_training_thread_except_the_checkpoints_own():
    files = sorted((ROOT / "plugin").rglob("*.py"))
    assert len(files) > 10
    seen = {}
    for f in files:
        writes = _writes(f)
        key = f.relative_to(ROOT).as_posix()
        if writes:
            seen[key] = writes
    # open(..., "w") + json.dump of forkwatch.json; torch.save of the selector generator
    assert {k: len(v) for k, v in seen.items()} == {"plugin/callback.py": 2, "plugin/selection/seam.py": 1}, seen
    assert seen["plugin/callback.py"] == ["open(mode='w')", "json.dump"] and seen["plugin/selection/seam.py"] == [
        "torch.save"]


def test_the_plugin_draws_no_progress_bar():
    for f in sorted((ROOT / "plugin").rglob("*.py")):
        bad = {m for m in _imports(f) if m.split(".")[0] in PROGRESS}
        bad |= {c for c in _calls(f) if c.split(".")[0] in PROGRESS or c.endswith("tqdm")}
        assert not bad, f"plugin/{f.name} draws progress: {sorted(bad)}"


def test_the_torch_layer_of_the_plugin_does_not_import_arrow():
    for f in sorted((ROOT / "plugin").rglob("*.py")):
        bad = {m for m in _imports(f) if m.split(".")[0] in ("pyarrow", "duckdb")}
        assert not bad, f"plugin/{f.name} imports {sorted(bad)}: Arrow types are the store's business"
