"""Selectors across two processes (torchrun, gloo on the CPU): batch-level cut-offs are global, not per rank, and
ICT trains on prompt groups split over the ranks (group_js over the siblings present, as documented)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from forkwatch.store import connect

SCRIPT = '''
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from pathlib import Path
import conftest, forkwatch
make = conftest.make_trainer.__wrapped__(Path({tmp!r}))
# per-device batch 2 < num_generations 4: every prompt group is split over the two ranks
trainer = make(max_steps=2, per_device_train_batch_size=2, num_generations=4, output_dir={out!r})
cb = forkwatch.attach(trainer, log_dir={runs!r}, run_name={name!r}, select={select!r}, stat_mantissa_bits=None,
                      record_completions_per_step=None, **{options!r})
trainer.train()
assert not cb.capture.faults.faults, dict(cb.capture.faults.faults)
'''


def _launch(tmp_path: Path, name: str, select: str, options: dict, port: int):
    script = tmp_path / f"{name}.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parents[1]), tmp=str(tmp_path), out=str(tmp_path / name),
                                    runs=str(tmp_path / "runs"), name=name, select=select, options=options))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
         str(script)],
        capture_output=True, text=True, timeout=110, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.timeout(120)
def test_high_entropy_cutoff_is_global_across_ranks(tmp_path):
    _launch(tmp_path, "he", "high_entropy", {"fraction": 0.2, "select_options": {"normalize": "all"}}, 29541)
    con = connect(str(tmp_path / "runs"))
    assert con.sql("SELECT DISTINCT c.rank FROM completions c ORDER BY 1").fetchall() == [(0,), (1,)]
    per_step = con.sql(
        "SELECT step, min(entropy) FILTER (selected > 0), max(entropy) FILTER (selected = 0), "
        "avg((selected > 0)::DOUBLE) FROM tokens GROUP BY step ORDER BY step"
    ).fetchall()
    assert len(per_step) == 2
    for _, lowest_kept, highest_dropped, kept in per_step:
        # one cut-off for the tokens of both ranks: every kept token is at least as uncertain as every dropped one
        assert lowest_kept >= highest_dropped
        assert 0.1 < kept < 0.4


@pytest.mark.timeout(120)
def test_ict_trains_on_groups_split_over_ranks(tmp_path):
    _launch(tmp_path, "ict", "ict", {"warmup_steps": 1, "fraction": 0.25}, 29543)
    con = connect(str(tmp_path / "runs"))
    rows = con.sql(
        "SELECT step, count(*) FILTER (group_js IS NULL), avg((selected > 0)::DOUBLE) FROM tokens "
        "GROUP BY step ORDER BY step"
    ).fetchall()
    assert [r[0] for r in rows] == [1, 2]
    assert all(missing == 0 for _, missing, _ in rows)  # every token scored
    assert rows[0][2] == 1.0  # dense warm-up step
    assert rows[1][2] < 0.5  # then the top quarter per completion (at least one token each)
