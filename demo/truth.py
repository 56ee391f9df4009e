"""The demo's ground truth next to forkwatch's records: the task's role of every recorded token.

`annotate` writes, for every recorded token of a run, its role (`task.roles`: decision, cosmetic fork,
confident-consequential, forced, mistake, off path) and whether it was a decision point, as a Parquet table under
`LOG_DIR/<run>/truth/` (the store's optional `truth` view, store/ground_truth.py); the dashboard's Forks page marks
the decision points when the table is present. `fork_report` compares forkwatch's forks (`tokens.is_fork`: the top
`fork_fraction` of each micro-batch's tokens by entropy) with that truth at one step.

Positions are characters of the completion (the tokenizer has one token per character); the EOS token sits at
position len(completion). Only positions on a correct prefix have a truth: after a wrong token nothing is a decision
(`on_path` is false there), and such positions count as neither decision nor forced.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from forkwatch.demo import task
from forkwatch.store import connect
from forkwatch.store.ground_truth import TRUTH, TRUTH_DIR

logger = logging.getLogger(__name__)

CERTAIN_NATS = 0.01  # a token below this entropy is "near-certain"


def completion_truth(prompt: str, completion: str, n_positions: int) -> tuple[list[bool], list[bool]]:
    """(is_decision, on_path) for positions 0..n_positions-1 of one completion."""
    points = set(task.decision_points(prompt, completion))
    reach = len(completion) + 1  # every position, EOS included, when the completion is correct throughout
    for i, ch in enumerate(completion):
        if ch not in task.valid_next(prompt, completion[:i]):
            reach = i + 1  # the wrong token itself had a truth (a decision or a forced position it missed)
            break
    return [i in points for i in range(n_positions)], [i < reach for i in range(n_positions)]


def completion_roles(prompt: str, completion: str, n_positions: int) -> list[str]:
    """The task's role of positions 0..n_positions-1 of one recorded completion (`task.roles`).

    A completion without EOS (cut at the length limit) has n_positions = len(completion): no EOS position."""
    return task.roles(prompt, completion, n_positions)


def annotate(log_dir: str | Path, run: str) -> Path | None:
    """Write the truth table of `run` (every recorded token position); returns its path, None without tokens."""
    con = connect(log_dir)
    rows = con.execute(
        "SELECT c.run_id, c.step, c.completion_id, c.prompt, c.completion, max(t.position) + 1 AS n "
        "FROM completions c JOIN tokens t USING (run_id, step, completion_id) "
        "WHERE c.run_id = ? GROUP BY ALL ORDER BY c.step, c.completion_id",
        [run],
    ).fetchall()
    if not rows:
        logger.info("run %s has no token records: no truth table written", run)
        return None
    cols: dict[str, list] = {f.name: [] for f in TRUTH}
    for run_id, step, cid, prompt, completion, n in rows:
        decision, on_path = completion_truth(prompt, completion or "", int(n))
        cols["run_id"] += [run_id] * n
        cols["step"] += [step] * n
        cols["completion_id"] += [cid] * n
        cols["position"] += list(range(n))
        cols["is_decision"] += decision
        cols["on_path"] += on_path
        cols["role"] += completion_roles(prompt, completion or "", int(n))
    folder = Path(log_dir) / run / TRUTH_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "part-0.parquet"
    tmp = folder / ".part-0.parquet.tmp"
    pq.write_table(pa.table(cols, schema=TRUTH), tmp)
    os.replace(tmp, path)  # readers see the old table or the new one, never half of one
    return path


@dataclass(frozen=True)
class ForkReport:
    run: str
    step: int
    tokens: int
    certain_share: float  # tokens with entropy < CERTAIN_NATS
    decision_share: float  # decision points among on-path tokens
    decision_entropy: float  # mean entropy (nats) at decision points
    forced_entropy: float  # mean entropy (nats) at forced tokens (the rest of a name)
    recall: float  # decision points that forkwatch marked as forks
    precision: float  # forks that are decision points (a fork after a wrong token is not one)

    def lines(self) -> list[str]:
        return [
            f"  forks vs ground truth ({self.run}, step {self.step}, {self.tokens} tokens): "
            f"recall {self.recall:.3f}, precision {self.precision:.3f}",
            f"  decision points {self.decision_share:.1%} of tokens, mean entropy {self.decision_entropy:.3f} nats "
            f"there vs {self.forced_entropy:.4f} at forced tokens; {self.certain_share:.1%} of tokens below "
            f"{CERTAIN_NATS} nats",
        ]


def fork_report(log_dir: str | Path, run: str, step: int | None = None) -> ForkReport | None:
    """forkwatch's forks against the truth table at `step` (default: the run's first recorded step)."""
    con = connect(log_dir)
    if step is None:
        step = con.execute("SELECT min(step) FROM truth WHERE run_id = ?", [run]).fetchone()[0]
        if step is None:
            return None
    row = con.execute(
        """
        SELECT count(*), avg((t.entropy < ?)::INT),
               sum(x.is_decision::INT), sum(x.on_path::INT),
               avg(t.entropy) FILTER (x.is_decision), avg(t.entropy) FILTER (x.role = 'forced'),
               sum((x.is_decision AND t.is_fork)::INT), sum(t.is_fork::INT)
        FROM tokens t JOIN truth x USING (run_id, step, completion_id, position)
        WHERE t.run_id = ? AND t.step = ?
        """,
        [CERTAIN_NATS, run, step],
    ).fetchone()
    n, certain, n_dec, n_path, h_dec, h_forced, hits, forks = row
    return ForkReport(
        run=run, step=int(step), tokens=int(n), certain_share=float(certain),
        decision_share=n_dec / n_path if n_path else math.nan,
        decision_entropy=float(h_dec) if h_dec is not None else math.nan,
        forced_entropy=float(h_forced) if h_forced is not None else math.nan,
        recall=hits / n_dec if n_dec else math.nan,
        precision=hits / forks if forks else math.nan,
    )  # fmt: skip


_TARGET_TEXT = {"decision": "consequential decisions",
                "consequential_or_mistake": "consequential decisions, confident-consequential tokens and mistakes"}


def detector_lines(log_dir: str | Path, run: str, step: int | None = None) -> list[str]:
    """The detector metrics of `run` at `step` (default: its first recorded step) as printable lines: per target,
    AUROC, average precision and precision among the top 20 % (with its ceiling) of entropy, Rényi-2 and group-JS
    next to the baselines (store/ground_truth.py)."""
    from forkwatch.store.ground_truth import detector_by_step

    m = detector_by_step(connect(log_dir), run)
    if m.empty:
        return []
    step = int(m["step"].min()) if step is None else step
    m = m[m["step"] == step]
    out = []
    for target, g in m.groupby("target", sort=False):
        first = g.iloc[0]
        out.append(f"  detector vs ground truth ({run}, step {step}, {first.tokens} tokens): "
                   f"{_TARGET_TEXT[target]} ({first.base_rate:.1%} of tokens)")
        out.append(f"    {'score':<10} {'AUROC':>6} {'AP':>6} {'precision@20%':>14} (ceiling)")
        for r in g.itertuples(index=False):
            out.append(f"    {r.predictor:<10} {r.auroc:6.3f} {r.average_precision:6.3f} {r.precision:14.3f} "
                       f"({r.ceiling:.3f})")
    return out


def detector_trend_lines(log_dir: str | Path, run: str, predictors: tuple[str, ...] = ("entropy", "renyi2",
                                                                                         "group_js")) -> list[str]:
    """How the detector metrics of `run` moved over training: first and last recorded step, per target."""
    from forkwatch.store.ground_truth import detector_by_step

    m = detector_by_step(connect(log_dir), run)
    if m.empty:
        return []
    first, last = int(m["step"].min()), int(m["step"].max())
    out = [f"  detector over training ({run}, step {first} -> {last}): AUROC / AP"]
    for target in _TARGET_TEXT:
        cells = []
        for p in predictors:
            a = m[(m.target == target) & (m.predictor == p) & (m.step == first)]
            b = m[(m.target == target) & (m.predictor == p) & (m.step == last)]
            if a.empty or b.empty:
                continue
            a, b = a.iloc[0], b.iloc[0]
            cells.append(f"{p} {a.auroc:.2f}/{a.average_precision:.2f} -> {b.auroc:.2f}/{b.average_precision:.2f}")
        out.append(f"    {target}: " + "; ".join(cells))
    return out
