"""`forkwatch forks LOG_DIR/RUN`: a run's measured forks, highest fork value first, with their text context; one-line
errors for a run without fork values, a step without measurements and a missing run."""

from __future__ import annotations

import subprocess
import sys

import pytest
from forkwatch.store import connect
from synthetic import write_fork_values, write_run

from forkwatch.cli import main


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("forks_cli")
    write_run(d, "valued", "healthy", n_steps=3, token_steps=3)  # 8 completions of 24 tokens per step
    write_fork_values(d, "valued", step=1, completion_id=8, values={3: 0.05, 10: 0.4, 20: 0.2})
    write_fork_values(d, "valued", step=2, completion_id=17, values={0: 0.3})
    write_run(d, "plain", "healthy", n_steps=3, token_steps=1)
    return d


def _text(log_dir, step: int, completion_id: int, lo: int, hi: int) -> str:
    con = connect(log_dir)
    rows = con.execute("SELECT text FROM token_text WHERE run_id = 'valued' AND step = ? AND completion_id = ? "
                       "AND position BETWEEN ? AND ? ORDER BY position", [step, completion_id, lo, hi]).fetchall()
    con.close()
    return "".join(r[0] for r in rows)


def test_forks_lists_the_highest_values_first_with_their_text(log_dir, capsys):
    assert main(["forks", str(log_dir / "valued")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("forkwatch forks: run valued, fork value measured at 2 step(s): step 1 3 positions, "
                             "2 consequential; step 2 1 positions, 1 consequential")
    ranked = [line for line in out if line[:5].strip().rstrip(".").isdigit()]
    assert [line.split("fork value ")[1][:5] for line in ranked] == ["0.400", "0.300", "0.200", "0.050"]
    assert "*" in ranked[0] and "*" not in ranked[3].split("entropy")[0]  # 0.05 is not consequential
    assert "Q(sampled" in ranked[0] and "best" in ranked[0]
    context = out[out.index(ranked[0]) + 1]  # position 10 of completion 8: 10 tokens before, 8 after
    token = _text(log_dir, 1, 8, 10, 10)
    assert context.strip() == f"…{_text(log_dir, 1, 8, 0, 9)}[{token}]{_text(log_dir, 1, 8, 11, 18)}…"


def test_forks_of_one_step_and_fewer_rows(log_dir, capsys):
    assert main(["forks", str(log_dir / "valued"), "--step", "1", "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "top 2 by fork value (step 1;" in out and "0.400" in out and "0.200" in out and "0.300" not in out


@pytest.mark.parametrize("argv, message", [
    (["forks", "{log}/plain"], "run 'plain' has no fork value measured: train with fork_value_every=N, or run"),
    (["forks", "{log}/valued", "--step", "0"], "no fork value at step 0; measured steps: 1, 2"),
    (["forks", "{log}/nowhere"], "no run 'nowhere' in"),
    (["forks", "{log}/valued", "--top", "0"], "--top 0: pass a positive number"),
])  # fmt: skip
def test_forks_errors_are_one_line(log_dir, capsys, argv, message):
    assert main([a.replace("{log}", str(log_dir)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_forks_never_imports_torch(log_dir):
    code = (f"import sys; from forkwatch.cli import main; main(['forks', {str(log_dir / 'valued')!r}]); "
            "sys.exit(1 if any(m.split('.')[0] in ('torch', 'transformers', 'trl') for m in sys.modules) else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
