"""Cost of ICT's reference reading (`select="ict", select_options={"against": "reference"}`) per generation batch:
`ReferencePolicy.score` (a no-grad backbone pass of the policy, the gathered head, the reference's own forward and
the chunked JS), next to one plain no-grad forward of the policy over the same batch for scale (TRL's own
old-log-prob pass costs about that).

    .venv/bin/python benchmarks/reference_js_bench.py --batch 8 --prompt 64 --length 256 --reps 5
    .venv/bin/python benchmarks/reference_js_bench.py --shape qwen0.5b --device cuda --batch 8 --length 1024

A real GRPOTrainer with forkwatch attached holds the policy and its frozen copy (the reference when the trainer has
no ref_model and the model is not PEFT); the batch is random token ids. Median over `--reps` calls after one untimed
call; torch threads fixed by `--threads`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch


def _trainer(shape: str, batch: int, device: str, out: str):
    from datasets import Dataset
    from forkwatch.demo.tiny import char_tokenizer, qwen_0_5b_shape, tiny_model
    from trl import GRPOConfig, GRPOTrainer

    tok = char_tokenizer()
    model = qwen_0_5b_shape() if shape == "qwen0.5b" else tiny_model(len(tok), hidden=128, layers=2)
    args = GRPOConfig(output_dir=out, per_device_train_batch_size=batch, num_generations=min(4, batch),
                      max_completion_length=8, max_steps=1, report_to="none", use_cpu=device == "cpu",
                      bf16=device != "cpu", save_strategy="no", disable_tqdm=True)
    trainer = GRPOTrainer(model=model, args=args, reward_funcs=[lambda completions, **_: [0.0] * len(completions)],
                          train_dataset=Dataset.from_dict({"prompt": ["1+1="] * 16}), processing_class=tok)
    return trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=("tiny", "qwen0.5b"), default="tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    import forkwatch

    with tempfile.TemporaryDirectory() as tmp:
        trainer = _trainer(a.shape, a.batch, a.device, tmp)
        forkwatch.attach(trainer, log_dir=f"{tmp}/logs", run_name="bench", select="ict",
                         select_options={"against": "reference"})
        model = trainer.model.to(a.device)
        ref = trainer._forkwatch.capture.reference
        vocab = model.config.vocab_size
        gen = torch.Generator().manual_seed(0)
        ids = lambda n: torch.randint(4, vocab, (a.batch, n), generator=gen).to(a.device)  # noqa: E731
        out = {"prompt_ids": ids(a.prompt), "completion_ids": ids(a.length),
               "prompt_mask": torch.ones(a.batch, a.prompt, dtype=torch.long, device=a.device),
               "completion_mask": torch.ones(a.batch, a.length, dtype=torch.long, device=a.device)}
        mask = out["completion_mask"].float()

        def sync():
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()

        def timed(fn) -> float:
            fn()
            times = []
            for _ in range(a.reps):
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                times.append(time.perf_counter() - t0)
            return statistics.median(times)

        full = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
        with torch.no_grad():
            forward = timed(lambda: model(input_ids=full, logits_to_keep=a.length + 1))
        score = timed(lambda: ref.score(out, mask))
    print(json.dumps({"shape": a.shape, "device": a.device, "batch": a.batch, "prompt": a.prompt,
                      "length": a.length, "reference": ref.kind, "policy_forward_s": round(forward, 4),
                      "reference_js_s": round(score, 4), "ratio": round(score / forward, 2)}))


if __name__ == "__main__":
    main()
