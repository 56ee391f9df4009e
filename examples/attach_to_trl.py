"""A standard TRL GRPO script with forkwatch attached in one line.

    python examples/attach_to_trl.py --model Qwen/Qwen2.5-0.5B-Instruct --log-dir runs --select ict
    forkwatch dashboard runs

Needs the model from the Hugging Face Hub (or a local model folder) and, for real speed, a GPU. The training data is
generated here (two-number arithmetic questions with a checked answer), so nothing else is downloaded; pass
`--dataset NAME` to train on a Hub data set with `prompt` and `solution` columns instead (rewarded by TRL's
`accuracy_reward`, which needs `pip install math-verify`). Everything except the `attach(...)` line is plain TRL.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

import torch
from datasets import Dataset, load_dataset
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from trl import GRPOConfig, GRPOTrainer

from forkwatch import attach

_LAST_NUMBER = re.compile(r"-?\d+(?=\D*$)")


def arithmetic_dataset(n: int, *, seed: int, chat: bool) -> Dataset:
    """`n` questions like "What is 37 + 48? ..." with their integer answers (column `answer`)."""
    rng = random.Random(seed)
    prompts, answers = [], []
    for _ in range(n):
        a, b, op = rng.randint(10, 99), rng.randint(10, 99), rng.choice("+-")
        question = f"What is {a} {op} {b}? Think step by step, then end with the number."
        prompts.append([{"role": "user", "content": question}] if chat else question + "\n")
        answers.append(str(a + b if op == "+" else a - b))
    return Dataset.from_dict({"prompt": prompts, "answer": answers})


def arithmetic_reward(completions: list, answer: list[str], **_) -> list[float]:
    """1.0 when the last number of the completion is the answer, else 0.0."""
    rewards = []
    for completion, expected in zip(completions, answer, strict=True):
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        m = _LAST_NUMBER.search(text)
        rewards.append(float(m is not None and m.group(0) == expected))
    return rewards


def load_tokenizer(name_or_path: str):
    """AutoTokenizer, except for a folder holding a generic fast tokenizer (no model-specific class).

    AutoTokenizer would replace such a tokenizer with the model type's own class (for a Qwen2 config, a byte-level
    one that drops the spaces of a char-level vocabulary), so it is loaded as what it was saved as.
    """
    config = Path(name_or_path) / "tokenizer_config.json"
    generic = ("TokenizersBackend", "PreTrainedTokenizerFast")
    if config.is_file() and json.loads(config.read_text()).get("tokenizer_class") in generic:
        tok = PreTrainedTokenizerFast.from_pretrained(name_or_path)
    else:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # GRPO left-pads prompts
    return tok


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Hub id (e.g. Qwen/Qwen2.5-0.5B-Instruct) or a local model folder")
    p.add_argument("--log-dir", default="runs", help="forkwatch log directory (one sub-folder per run)")
    p.add_argument("--run-name", default=None, help="forkwatch run id (default: a timestamp)")
    p.add_argument("--select", default=None, help="token selector: ict, high_entropy, random, ... (default: watch only)")
    p.add_argument("--dataset", default=None, help="Hub data set with 'prompt' and 'solution' columns (optional)")
    p.add_argument("--output-dir", default="grpo_output", help="TRL output directory (checkpoints)")
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--learning-rate", type=float, default=1e-6)
    p.add_argument("--batch-size", type=int, default=8, help="completions per device and step")
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--max-completion-length", type=int, default=256)
    p.add_argument("--report-to", default="none", help="TRL/transformers report_to (wandb, tensorboard, trackio)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> GRPOTrainer:
    args = parse_args(argv)
    tokenizer = load_tokenizer(args.model)
    if args.dataset is None:
        train_dataset = arithmetic_dataset(2000, seed=args.seed, chat=tokenizer.chat_template is not None)
        reward_funcs = arithmetic_reward
    else:
        from trl.rewards import accuracy_reward

        train_dataset = load_dataset(args.dataset, split="train")
        reward_funcs = accuracy_reward

    cuda = torch.cuda.is_available()
    config = GRPOConfig(
        output_dir=args.output_dir,
        learning_rate=args.learning_rate,
        per_device_train_batch_size=args.batch_size,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        max_steps=args.max_steps,
        logging_steps=1,
        save_strategy="no",
        report_to=args.report_to,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        use_cpu=not cuda,
        seed=args.seed,
    )
    trainer = GRPOTrainer(
        model=args.model,
        args=config,
        reward_funcs=reward_funcs,
        train_dataset=train_dataset,
        processing_class=tokenizer,
    )
    attach(trainer, log_dir=args.log_dir, run_name=args.run_name, select=args.select)  # <- the one line
    trainer.train()
    return trainer


if __name__ == "__main__":
    main()
