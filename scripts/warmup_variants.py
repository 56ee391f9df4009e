"""How well does a warm-up recipe teach the demo task? Trains the warm-up model for each variant given (fields of
`WarmupSettings` as JSON; the others keep their defaults) and prints one JSON line per variant: the settings and the
policy's shape on 256 fresh samples at two sampling seeds (`demo/evaluate.py`). docs/experiments.md, "The warm-up
model", has the table and the variants tried.

    python scripts/warmup_variants.py '{}' '{"steps": 1500, "batch_size": 64, "schedule": "constant"}'
    python scripts/warmup_variants.py '{"steps": 500}' '{"lr": 6e-3}' --threads 1

Nothing is cached: each variant trains afresh (the models are not kept).
"""

from __future__ import annotations

import argparse
import json
import os


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("variants", nargs="+", metavar="JSON", help="WarmupSettings fields, e.g. '{\"steps\": 500}'")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the demo's default: 1)")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from forkwatch.demo import evaluate, warmup

    for text in args.variants:
        fields = json.loads(text)
        model, tok = warmup.train(warmup.WarmupSettings(**fields), progress=False)
        tok.padding_side = "left"  # generation left-pads, as GRPO does (warmup.load sets the same)
        row = {"settings": fields}
        for seed in (0, 1):
            row[f"sampling_seed_{seed}"] = {k: round(v, 4) for k, v in evaluate.heldout(model, tok, seed=seed).items()}
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
