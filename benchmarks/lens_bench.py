"""Cost of the collapse lenses, piece by piece: the entropy spectrum per step, the effective rank per completion, the
role of every vocabulary entry (once per run), and one scoring of the probes.

    .venv/bin/python benchmarks/lens_bench.py            # CPU, torch threads 1
    .venv/bin/python benchmarks/lens_bench.py --device cuda

Each figure is the median of `--repeats` timed calls after one untimed call. Per-step costs are then amortised by
the defaults (effective rank: 4 completions every 10 steps; probes: 4 probes every 10 steps), which is what a step
pays on average; the whole-step overhead is benchmarks/overhead.py's business.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import string
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(fn, repeats: int) -> float:
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from forkwatch.demo.tiny import tiny_model
    from forkwatch.plugin.lenses import Probe, score_probes
    from forkwatch.plugin.token_math import effective_rank
    from forkwatch.store.roles import role_of
    from forkwatch.store.spectrum import spectrum_counts

    res: dict[str, float] = {}
    rng = np.random.default_rng(0)
    for n in (8_192, 262_144, 2_097_152):
        ent = rng.exponential(0.3, n).astype(np.float32)
        res[f"spectrum_ms/{n}_tokens"] = 1e3 * timed(lambda e=ent: spectrum_counts(e), args.repeats)
    for h in (64, 896, 3584):
        x = torch.randn(512, h, device=args.device)
        res[f"effective_rank_ms/512x{h}"] = 1e3 * timed(lambda x=x: effective_rank(x), args.repeats)
    words = ["".join(random.Random(i).choices(string.ascii_letters + string.digits + "+=. ", k=1 + i % 9))
             for i in range(151_936)]
    words = [("Ġ" if i % 3 == 0 else "") + w for i, w in enumerate(words)]

    def roles() -> None:
        role_of.cache_clear()
        for w in words:
            role_of(w)

    res["roles_s/151936_vocab"] = timed(roles, max(1, args.repeats // 3))
    for name, kw in (("tiny", dict(vocab_size=64)),
                     ("bigvocab", dict(vocab_size=151_936, hidden=896, layers=2, heads=14, kv_heads=2,
                                       intermediate=1024, tie_embeddings=True))):
        model = tiny_model(**kw).to(args.device)
        g = torch.Generator().manual_seed(0)
        probes = [Probe(i, tuple(torch.randint(4, kw["vocab_size"], (64,), generator=g).tolist()),
                        tuple(torch.randint(4, kw["vocab_size"], (128,), generator=g).tolist())) for i in range(4)]
        res[f"probes_ms/{name}_4x(64+128)"] = 1e3 * timed(
            lambda m=model, p=probes: score_probes(m, p, 1, temperature=1.0, k=5, device=args.device), args.repeats)
    res["per_step_ms/effective_rank_896_amortised"] = res["effective_rank_ms/512x896"] * 4 / 10
    res["per_step_ms/probes_bigvocab_amortised"] = res["probes_ms/bigvocab_4x(64+128)"] / 10
    meta = {"device": args.device, "threads": args.threads, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps({"meta": meta, "results": {k: round(v, 3) for k, v in res.items()}}, indent=1))


if __name__ == "__main__":
    main()
