"""A brief supervised warm-up that teaches a tiny Qwen2-style model the demo task's format, cached on disk.

GRPO needs a policy that already gets some answers right (a group whose rewards are all equal carries no signal),
so the randomly initialised model first imitates written-out solutions for a few hundred steps. It stops while it
still makes mistakes: that uncertainty is what the GRPO runs then sharpen, or collapse.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from forkwatch.demo import task
from forkwatch.demo.tiny import char_tokenizer, tiny_model
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

_DONE = "warmup.json"  # written last: its presence means the folder holds a complete model


@dataclass(frozen=True)
class WarmupSettings:
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    steps: int = 300
    batch_size: int = 64
    lr: float = 3e-3
    n_problems: int = 5000
    seed: int = 0

    def key(self) -> str:
        """A short hash of everything that shapes the warm-up model (settings + the task's alphabet)."""
        blob = json.dumps({**asdict(self), "chars": task.CHARS, "task": "arith2-v1"}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _batch(problems: list[task.Problem], tok: PreTrainedTokenizerFast) -> dict[str, torch.Tensor]:
    """Prompt + completion + EOS, right-padded; the loss sees only the completion and EOS.

    The prompt is tokenized on its own exactly as GRPOTrainer does (`tok(text=prompts)`, no BOS), so the model
    learns to continue the very token sequences it will be sampled from.
    """
    rows, labels = [], []
    for p in problems:
        prompt_ids = tok(p.prompt)["input_ids"]
        completion_ids = tok(p.completion)["input_ids"] + [tok.eos_token_id]
        rows.append(prompt_ids + completion_ids)
        labels.append([-100] * len(prompt_ids) + completion_ids)
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.pad_token_id)
    lab = torch.full((len(rows), width), -100)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, y) in enumerate(zip(rows, labels, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(y)] = torch.tensor(y)
        att[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": att, "labels": lab}


def train(settings: WarmupSettings, *, progress: bool = True) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    """Supervised next-token training on written-out solutions; returns the model and its tokenizer."""
    tok = char_tokenizer(task.CHARS)
    model = tiny_model(
        len(tok),
        hidden=settings.hidden,
        layers=settings.layers,
        heads=settings.heads,
        kv_heads=settings.kv_heads,
        max_positions=64,
        seed=settings.seed,
    )
    problems = task.make_problems(settings.n_problems, seed=settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))  # short linear ramp
    model.train()
    bar = tqdm(range(settings.steps), desc="warm-up (supervised)", disable=not progress, unit="step")
    for _ in bar:
        idx = torch.randint(len(problems), (settings.batch_size,), generator=gen).tolist()
        loss = model(**_batch([problems[i] for i in idx], tok)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    return model, tok


def cached_warmup(out_dir: str | Path, settings: WarmupSettings, *, progress: bool = True) -> Path:
    """The folder of the warm-up model for `settings` under `out_dir/warmup/`, training it only if absent."""
    path = Path(out_dir) / "warmup" / settings.key()
    if (path / _DONE).exists():
        logger.info("reusing the warm-up model in %s", path)
        return path
    model, tok = train(settings, progress=progress)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    (path / _DONE).write_text(json.dumps(asdict(settings), indent=2))
    return path


def load(path: str | Path) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    """Model and tokenizer from a warm-up folder (char tokenizer loaded as such; see demo/tiny.py)."""
    from transformers import AutoModelForCausalLM

    tok = PreTrainedTokenizerFast.from_pretrained(path)
    tok.padding_side = "left"
    return AutoModelForCausalLM.from_pretrained(path), tok
