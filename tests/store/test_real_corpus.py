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

REAL = Path(__file__).resolve().parents[2] / "corpus" / "real"
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
    assert header[0] == "step" and any("entropy" in c.lower() for c in header)
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


def test_md_table_reads_the_step_table_under_the_named_heading_and_drops_bold_marks():
    report = (
        b"## Attempt 1\n\n| Step | Reward | Entropy |\n|---|---|---|\n| 1 | 0.1 | 9.9 |\n\n"
        b"## Attempt 2\n\nThe run so far:\n\n| Step | Reward | GradNorm | Entropy |\n|------|--------|----------|---------|\n"
        b"| 1 | 0.391 | 12.75 | 1.324 |\n| 2 | 0.445 | **70.29** | 1.266 |\n\n| Step | pass@1 |\n|---|---|\n| 10 | 0.3 |\n"
        b"## Attempt 3\n"
    )
    rows = extract.from_md_table(report, "Attempt 2")
    assert extract.to_csv(rows).splitlines() == [
        "step,Reward,GradNorm,Entropy",
        "1,0.391,12.75,1.324",
        "2,0.445,70.29,1.266",
    ]
    with pytest.raises(ValueError, match="exactly one"):
        extract.from_md_table(report, "Attempt 9")


def test_xtuner_console_joins_each_rollouts_statistics_and_entropy_on_the_rollout_number():
    log = (
        b"[XTuner][RANK 0][2025-12-26 18:30:27][INFO][RLTrainer] Rollout 1 data statistics:\n"
        b"  - batch_size          : 8192\n"
        b"  - rewards/mean        : 0.5039\n"
        b"  - response_len/mean   : 18985.8778\n"
        b"[XTuner][RANK 0][2025-12-26 18:35:55][INFO][TrainingWorker] Rollout 1: avg entropy: 0.7321, "
        b"avg rollout entropy: 0.7316\n"
        b"[XTuner][RANK 0][2025-12-26 18:37:04][INFO][TrainingWorker] Rollout 1 Step 0: total_loss=-0.0908, "
        b"grad_norm=0.0560\n"
        b"  - not/a_statistic : 3\n"
        b"[XTuner][RANK 0][2025-12-26 19:30:27][INFO][RLTrainer] Rollout 2 data statistics:\n"
        b"  - rewards/mean        : 0.5323\n"
        b"[XTuner][RANK 0][2025-12-26 19:35:55][INFO][TrainingWorker] Rollout 2: avg entropy: 0.7479, "
        b"avg rollout entropy: 0.7473\n"
    )
    assert extract.to_csv(extract.from_xtuner_console(log)).splitlines() == [
        "step,batch_size,rewards/mean,response_len/mean,avg entropy,avg rollout entropy",
        "1,8192,0.5039,18985.8778,0.7321,0.7316",
        "2,,0.5323,,0.7479,0.7473",
    ]


def test_columns_keeps_only_the_named_metrics_and_refuses_a_name_the_source_lacks():
    rows = [{"step": 1, "actor/entropy": 0.2, "actor/lr": 1e-05, "critic/score/mean": 0.7}]
    assert extract.select(rows, "actor/entropy,critic/score/mean") == [
        {"step": 1, "actor/entropy": 0.2, "critic/score/mean": 0.7}
    ]
    assert extract.select(rows, None) == rows
    with pytest.raises(ValueError, match="actor/entropy_typo"):
        extract.select(rows, "actor/entropy_typo")


def test_csv_keeps_each_steps_logged_cells_and_columns_drops_a_step_that_logged_none_of_them():
    export = (
        b"step,entropy,len_mean,timing_s/step,val_acc_mean1\r\n"
        b"0,,,,0.0849\r\n"
        b"2,0.3999,279.291015625,31.5,\r\n"
        b"1,0.3721,276.1904296875,30.1,\r\n"
        b"50,,197.0244140625,,0.7536\r\n"
    )
    rows = extract.from_csv(export)
    assert rows == [
        {"step": 0, "val_acc_mean1": "0.0849"},
        {"step": 1, "entropy": "0.3721", "len_mean": "276.1904296875"},
        {"step": 2, "entropy": "0.3999", "len_mean": "279.291015625"},
        {"step": 50, "len_mean": "197.0244140625", "val_acc_mean1": "0.7536"},
    ]
    assert extract.to_csv(extract.select(rows, "entropy,len_mean")).splitlines() == [
        "step,entropy,len_mean",
        "1,0.3721,276.1904296875",
        "2,0.3999,279.291015625",
        "50,,197.0244140625",
    ]
