"""The SQL page's example queries (label -> SQL), one click away. Each stays cheap on a 20M-token run: the token
examples name their steps, so the row groups of other steps are skipped by their statistics
(benchmarks/dashboard_bench.py times the heaviest)."""

from __future__ import annotations

EXAMPLES = {
    "Runs": "SELECT run_id, name, status, last_step, dropped, faults, faults_detail FROM runs",
    "Entropy per step": "SELECT run_id, step, entropy_mean, entropy_p90, renyi2_mean, group_js_mean, reward_mean\n"
    "FROM steps ORDER BY run_id, step",
    "Fork tokens, first 50 steps": "SELECT run_id, text, count(*) AS forks\nFROM token_text WHERE is_fork AND step < 50\n"
    "GROUP BY ALL ORDER BY forks DESC LIMIT 20",
    "Highest-entropy tokens of a step": "SELECT run_id, step, completion_id, position, text, entropy\n"
    "FROM token_text WHERE step = 0 ORDER BY entropy DESC LIMIT 20",
    "Reward by prompt": "SELECT run_id, prompt, count(*) AS n, avg(reward) AS reward\nFROM completions "
    "GROUP BY ALL ORDER BY n DESC LIMIT 20",
    "Entropy spectrum per step": "SELECT run_id, step, generate_subscripts(entropy_spectrum, 1) - 1 AS bin,\n"
    "       unnest(entropy_spectrum) AS tokens\nFROM steps ORDER BY run_id, step, bin",
    "Effective rank beside entropy": "SELECT run_id, step, entropy_mean, effective_rank_mean\nFROM steps WHERE "
    "effective_rank_mean IS NOT NULL ORDER BY run_id, step",
    "Fork roles per step, first 50 steps": "SELECT run_id, step, role, count(*) AS forks,\n"
    "       count(*) / sum(count(*)) OVER (PARTITION BY run_id, step) AS share\n"
    "FROM token_text WHERE is_fork AND step < 50 GROUP BY run_id, step, role ORDER BY run_id, step, forks DESC",
    "Probe tokens across steps": "SELECT p.run_id, p.probe_id, p.step, p.position, v.text, p.entropy\n"
    "FROM probes p LEFT JOIN vocab v USING (run_id, token_id)\nWHERE p.probe_id = 0 ORDER BY p.run_id, p.step, "
    "p.position",
}
