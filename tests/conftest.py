"""Shared fixtures: a real `GRPOTrainer` on a tiny model built in code (no network), in seconds on a CPU.

    def test_something(make_trainer):
        trainer = make_trainer(max_steps=2, loss_type="dapo")   # any GRPOConfig field as an override
        trainer.train()

`make_trainer(*, arch="qwen2", tie_embeddings=False, peft=False, model=None, reward_funcs=None, dataset=None,
**grpo_overrides)` builds model, char tokenizer, a 16-prompt arithmetic data set and a reward function.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test touches the Hub: an accidental download fails fast
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
torch.set_num_threads(1)

PROMPTS = [f"{a}+{b}=" for a in range(4) for b in range(4)]

# The TRL configurations every seam must survive (issue matrix); test modules add their own cases to it.
TRL_MATRIX = {
    "grad_accum_2": dict(gradient_accumulation_steps=2, per_device_train_batch_size=4),
    "steps_per_generation_2": dict(steps_per_generation=2),
    "num_iterations_2": dict(num_iterations=2),
    "beta_ref_model": dict(beta=0.04),
    "dapo": dict(loss_type="dapo"),
    "dr_grpo": dict(loss_type="dr_grpo"),
    "bnpo": dict(loss_type="bnpo"),
}


def digit_reward(completions: list[str], **kwargs) -> list[float]:
    """Fraction of digits in the completion: varies between rollouts, so advantages are non-zero."""
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


def length_reward(completions: list[str], **kwargs) -> list[float]:
    """A second reward function, so per-function rewards can be told apart."""
    return [-0.1 * len(text) for text in completions]


def tiny_grpo_config(output_dir: str, **overrides):
    from trl import GRPOConfig

    defaults = dict(
        output_dir=output_dir,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=8,
        max_steps=2,
        learning_rate=1e-2,  # large, so a few steps visibly move a tiny model
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        temperature=1.0,
    )
    defaults.update(overrides)
    return GRPOConfig(**defaults)


@pytest.fixture
def tokenizer():
    from forkwatch.demo.tiny import char_tokenizer

    return char_tokenizer()


@pytest.fixture
def make_trainer(tmp_path) -> Callable[..., object]:
    """Factory for real GRPOTrainers on tiny models; every call gets its own output_dir under tmp_path."""
    from datasets import Dataset
    from forkwatch.demo.tiny import char_tokenizer, tiny_model
    from trl import GRPOTrainer

    counter = iter(range(1_000))

    def make(
        *,
        arch: str = "qwen2",
        tie_embeddings: bool = False,
        peft: bool = False,
        model=None,
        reward_funcs=None,
        dataset=None,
        model_seed: int = 0,
        **grpo_overrides,
    ):
        tok = char_tokenizer()
        if model is None:
            model = tiny_model(len(tok), arch=arch, tie_embeddings=tie_embeddings, seed=model_seed)
        peft_config = None
        if peft:
            from peft import LoraConfig

            peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        k = next(counter)
        output_dir = grpo_overrides.pop("output_dir", None) or str(tmp_path / f"out{k}")
        if grpo_overrides.get("beta", 0.0) != 0.0 and not peft:
            # TRL builds the reference model from a path: save the tiny model and pass its folder
            path = tmp_path / f"model{k}"
            model.save_pretrained(path)
            model = str(path)
        args = tiny_grpo_config(output_dir, **grpo_overrides)
        return GRPOTrainer(
            model=model,
            args=args,
            reward_funcs=reward_funcs or [digit_reward, length_reward],
            train_dataset=dataset or Dataset.from_dict({"prompt": PROMPTS}),
            processing_class=tok,
            peft_config=peft_config,
        )

    return make


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    """A folder holding the demo's warm-up model at its default settings, trained once per test run and shared by
    every demo test: pass it as `forkwatch demo --cache DIR` or `run_demo(cache_dir=DIR)`. The model's folder in
    it is keyed by the settings (`WarmupSettings.key`), so a test that changes them trains its own beside it."""
    from forkwatch.demo.pipeline import DEFAULT
    from forkwatch.demo.warmup import cached_warmup

    root = tmp_path_factory.mktemp("demo_cache")
    cached_warmup(root, DEFAULT.warmup, progress=False)
    return root
