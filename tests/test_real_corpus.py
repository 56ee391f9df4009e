"""The real-run corpus (corpus/real/): its manifest holds what the issue asks of every run, each CSV is a per-step
series with the steps the manifest states, and extract.py reads each log format as the source wrote it.

The CSVs' agreement with their original logs needs the public repositories (`extract.py --all --check --clones
DIR`), so it is not a test here; these tests need no network."""

from __future__ import annotations

import csv
import importlib.util
import re
import struct
from pathlib import Path

import pytest

REAL = Path(__file__).resolve().parents[1] / "corpus" / "real"
COLUMNS = [
    "id", "file", "framework", "repository", "path", "commit", "model", "task", "algorithm",
    "steps", "logging_every", "label", "quote", "quote_source", "notes",
]  # fmt: skip

spec = importlib.util.spec_from_file_location("extract", REAL / "extract.py")
extract = importlib.util.module_from_spec(spec)
spec.loader.exec_module(extract)


def _manifest() -> list[dict]:
    with open(REAL / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def _series(name: str) -> list[dict]:
    with open(REAL / name, newline="") as f:
        return list(csv.DictReader(f))


def test_the_manifest_has_the_issues_columns_and_enough_runs_repositories_and_frameworks():
    with open(REAL / "manifest.csv", newline="") as f:
        assert next(csv.reader(f)) == COLUMNS
    rows = _manifest()
    assert len(rows) >= 20
    assert len({r["repository"] for r in rows}) >= 6
    assert len({r["framework"] for r in rows}) >= 2
    assert len({r["id"] for r in rows}) == len(rows)


@pytest.mark.parametrize("row", _manifest(), ids=lambda r: r["id"])
def test_each_run_has_provenance_a_label_backed_by_a_quote_and_a_per_step_entropy_series(row):
    assert row["framework"] in {"trl", "verl", "openrlhf", "other"}
    assert re.fullmatch(r"[0-9a-f]{40}", row["commit"])
    assert re.fullmatch(r"[\w.-]+/[\w.-]+", row["repository"])
    assert row["model"] and row["task"] and row["algorithm"] and row["path"]
    assert row["label"] in {"healthy", "collapse", "explosion", "unlabelled"}
    assert bool(row["quote"]) == bool(row["quote_source"]) == (row["label"] != "unlabelled")
    assert row["notes"].startswith("extract: format=")

    series = _series(row["file"])
    header = list(series[0])
    assert header[0] == "step" and any("entropy" in c for c in header)
    steps = [int(r["step"]) for r in series]
    assert steps == sorted(set(steps)), "steps increase, each once"
    assert steps[-1] == int(row["steps"])
    assert min(b - a for a, b in zip(steps, steps[1:])) == int(row["logging_every"])
    for r in series:  # a table of numbers: every logged cell parses
        for value in r.values():
            if value:
                float(value)


TQDM = "| {n}/200 [00:10<01:00,  4.00s/it]\r" + " " * 40 + "\r\r  5%|▌   | {n}/200 [00:10<01:00,  4.00s/it]"


def test_trl_console_numbers_the_logged_dicts_by_the_logging_interval_and_refuses_a_wrong_one():
    log = (
        TQDM.format(n=5) + TQDM.format(n=10) + "\n"
        "{'loss': 0.1, 'grad_norm': 0.5, 'entropy': 0.42, 'reward': 0.9, 'num_tokens': 100.0, 'epoch': 0.01}\n"
        "{'loss': 0.0, 'grad_norm': 0.4, 'entropy': 0.40, 'reward': 1.0, 'num_tokens': 200.0, 'epoch': 0.02}\n"
        "{'eval_loss': 0.3, 'eval_reward': 0.5, 'epoch': 0.02}\n"
        "{'train_runtime': 12.0, 'train_loss': 0.05, 'epoch': 0.02}\n"
    ).encode()
    rows = extract.from_trl_console(log, every=5)
    assert rows == [
        {"step": 5, "loss": 0.1, "grad_norm": 0.5, "entropy": 0.42, "reward": 0.9},
        {"step": 10, "loss": 0.0, "grad_norm": 0.4, "entropy": 0.40, "reward": 1.0},
    ]
    with pytest.raises(ValueError, match="--every"):
        extract.from_trl_console(log, every=4)


def test_verl_console_keeps_the_policy_metrics_as_printed_and_the_later_line_of_a_repeated_step():
    line = (
        "\x1b[36m(TaskRunner pid=1)\x1b[0m step:{s} - actor/entropy:np.float64({e}) - actor/pg_loss:-0.01"
        " - critic/score/mean:0.25 - timing_s/step:30.1 - perf/throughput:900 - response_length/mean:120.5"
    )
    log = "\n".join([line.format(s=1, e="0.5"), line.format(s=2, e="0.4"), line.format(s=2, e="0.45")]).encode()
    text = extract.to_csv(extract.from_verl_console(log))
    assert text.splitlines() == [
        "step,actor/entropy,actor/pg_loss,critic/score/mean,response_length/mean",
        "1,0.5,-0.01,0.25,120.5",
        "2,0.45,-0.01,0.25,120.5",
    ]


def _event(step: int, tag: str, value: float) -> bytes:
    """One TFRecord of a TensorBoard scalar: Event{step=2, summary=5{value=1{tag=1, simple_value=2}}}."""

    def field(number: int, payload: bytes) -> bytes:
        return bytes([number << 3 | 2, len(payload)]) + payload

    val = field(1, tag.encode()) + bytes([2 << 3 | 5]) + struct.pack("<f", value)
    event = bytes([2 << 3 | 0, step]) + field(5, field(1, val))
    return struct.pack("<Q", len(event)) + b"\0" * 4 + event + b"\0" * 4


def test_tfevents_scalars_become_rows_by_step_in_their_shortest_float32_form():
    raw = b"".join(
        [_event(10, "train/entropy", 0.3), _event(10, "train/epoch", 0.01), _event(20, "train/entropy", 0.25)]
    )
    assert extract.to_csv(extract.from_tfevents(raw)).splitlines() == ["step,train/entropy", "10,0.3", "20,0.25"]


def test_a_source_without_entropy_is_refused():
    with pytest.raises(ValueError, match="entropy"):
        extract.to_csv([{"step": 1, "loss": 0.1, "reward": 0.5}])
