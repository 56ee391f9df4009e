"""The GPU benchmark's dry run: benchmarks/gpu.py at a tiny shape on the CPU, every variant for one round of one
timed step, so the script the GPU machine runs cannot rot between GPU runs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.py"


@pytest.fixture(scope="module")
def gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_bench"] = module  # its dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_bench"]


def dry_run(gpu_bench, out: Path, *extra: str) -> dict:
    gpu_bench.main(["--out", str(out), "--config", "tiny", "--device", "cpu", "--threads", "1", *extra])
    return json.loads((out / "gpu.json").read_text())


def test_dry_run_measures_every_variant_and_writes_json_and_table(gpu_bench, tmp_path):
    from forkwatch.plugin.capture import Capture

    before = Capture.on_generation
    result = dry_run(gpu_bench, tmp_path, "--rounds", "1", "--steps", "1")
    rows = result["variants"]
    assert list(rows) == ["plain", "attach", "ict", "high_entropy"]
    assert result["meta"]["rounds_done"] == 1 and not result["meta"]["stopped_early"]
    for name, row in rows.items():
        assert row["timed_steps"] == 1, name
        assert row["step_s_median"] > 0, name
        assert row["peak_gpu_bytes"] is None and row["gpu_bytes_at_start"] is None  # on the CPU: no GPU memory
    assert rows["plain"]["step_x_plain"] == 1.0
    assert rows["plain"]["store_bytes_per_step"] is None and rows["plain"]["forkwatch_ms_per_step"] is None
    for name in ("attach", "ict", "high_entropy"):
        row = rows[name]
        assert row["store_bytes_per_step"] > 0 and row["vocab_bytes_per_run"] > 0, name
        assert row["hook_ms_per_step"]["Capture.on_generation"] > 0, name
        assert row["hook_ms_per_step"]["ForkwatchCallback.on_step_end"] > 0, name
        assert row["forkwatch_ms_per_step"] >= max(row["hook_ms_per_step"].values()), name
    # the selectors run in place of TRL's entropy mask; monitoring alone never calls it
    assert rows["ict"]["hook_ms_per_step"]["Capture.select"] > 0
    assert rows["high_entropy"]["hook_ms_per_step"]["Capture.select"] > 0
    assert rows["attach"]["hook_ms_per_step"]["Capture.select"] == 0
    table = (tmp_path / "gpu.md").read_text()
    for name in rows:
        assert f"| {name} | 1 | " in table
    assert "| Capture.on_generation | " in table
    assert Capture.on_generation is before  # the hook clock put forkwatch's methods back


def test_spent_budget_still_writes_what_was_measured(gpu_bench, tmp_path):
    result = dry_run(gpu_bench, tmp_path, "--rounds", "3", "--steps", "3", "--budget-s", "0")
    assert result["meta"]["stopped_early"] and result["meta"]["rounds_done"] == 0
    assert all(row["timed_steps"] == 0 and row["step_s_median"] is None for row in result["variants"].values())
    assert "STOPPED EARLY" in (tmp_path / "gpu.md").read_text()
