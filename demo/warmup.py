"""A brief supervised warm-up that teaches a tiny Qwen2-style model the demo task, cached on disk.

Each training example writes a problem's items in a fresh random order, and each two-name item under either name
(even odds), so the model learns that every order and spelling is correct: at a decision point it spreads its
probability over the items not yet written, at a cosmetic fork over the two names, and everywhere else (the rest of
a name, the comma, EOS) it becomes near-certain. The examples also carry the task's habit (`task.HABIT`): after
"raven," heron is spelt "heran" nine times in ten, a confident mistake the model learns. That is the shape GRPO then
sharpens, keeps, or collapses.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
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
    # Names of 3-5 letters: the model must track which items remain by content, not position. 800 steps of 48 with a
    # cosine decay learn the task as well as 1,500 of 64 at a constant rate did, on 40 % of the examples; a higher peak
    # rate (6e-3) never learns to track the items, a lower one (2e-3) or fewer steps leave the model less certain
    # (docs/experiments.md, "The warm-up model").
    steps: int = 800
    batch_size: int = 48
    lr: float = 3e-3  # the peak rate, reached after `ramp_steps`
    ramp_steps: int = 20  # a short linear ramp: Adam's first steps move every weight by the full rate
    # after the ramp: "constant" keeps the peak; "cosine" decays it to 0 at the last step
    schedule: str = "cosine"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule={self.schedule!r}: use 'constant' or 'cosine'")

    def key(self) -> str:
        """A short hash of everything that shapes the warm-up model (settings + the task's alphabet)."""
        blob = json.dumps({**asdict(self), "chars": task.CHARS, "words": task.WORDS, "task": "items-v2", "synonyms": task.SYNONYMS, "habit": task.HABIT}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _examples(n: int, rng: random.Random) -> list[tuple[str, str]]:
    """`n` (prompt, completion) pairs: random items, written in a random order (each of the 120 equally likely),
    each two-name item under either name, and the habit's misspelling where it applies."""
    before, name, habit, rate = task.HABIT
    out = []
    for p in task.make_problems(n, seed=rng.randrange(2**31)):
        names = [rng.choice(task.NAMES[k]) for k in rng.sample(p.keys, len(p.keys))]
        names = [habit if w == name and i and names[i - 1] == before and rng.random() < rate else w
                 for i, w in enumerate(names)]
        out.append((p.prompt, task.SEP.join(names)))
    return out


def _batch(problems: list[tuple[str, str]], tok: PreTrainedTokenizerFast) -> dict[str, torch.Tensor]:
    """Prompt + completion + EOS, right-padded; the loss sees only the completion and EOS.

    The prompt is tokenized on its own exactly as GRPOTrainer does (`tok(text=prompts)`, no BOS), so the model
    learns to continue the very token sequences it will be sampled from.
    """
    rows, labels = [], []
    for prompt, completion in problems:
        prompt_ids = tok(prompt)["input_ids"]
        completion_ids = tok(completion)["input_ids"] + [tok.eos_token_id]
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


def _rate(settings: WarmupSettings, step: int) -> float:
    """The learning rate at `step` as a fraction of the peak: a linear ramp, then constant or a cosine to 0."""
    if step < settings.ramp_steps:
        return (step + 1) / settings.ramp_steps
    if settings.schedule == "constant":
        return 1.0
    done = (step - settings.ramp_steps) / max(1, settings.steps - settings.ramp_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, done)))


def train(
    settings: WarmupSettings, *, progress: bool = True, on_step: Callable[[int, float], None] | None = None
) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    """Supervised next-token training on written-out solutions; returns the model and its tokenizer. `on_step(step,
    loss)` is called after every step (1-based)."""
    tok = char_tokenizer(task.CHARS)
    model = tiny_model(
        len(tok),
        hidden=settings.hidden,
        layers=settings.layers,
        heads=settings.heads,
        kv_heads=settings.kv_heads,
        max_positions=96,
        seed=settings.seed,
    )
    rng = random.Random(settings.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(_rate, settings))
    model.train()
    bar = tqdm(range(settings.steps), desc="warm-up (supervised)", disable=not progress, unit="step")
    for step in bar:
        loss = model(**_batch(_examples(settings.batch_size, rng), tok)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if on_step is not None:
            on_step(step + 1, loss.item())
    model.eval()
    return model, tok


def folder(out_dir: str | Path, settings: WarmupSettings) -> Path:
    """Where the warm-up model for `settings` is cached under `out_dir`."""
    return Path(out_dir) / "warmup" / settings.key()


def is_cached(out_dir: str | Path, settings: WarmupSettings) -> bool:
    return (folder(out_dir, settings) / _DONE).exists()


def cached_warmup(
    out_dir: str | Path,
    settings: WarmupSettings,
    *,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> Path:
    """The folder of the warm-up model for `settings` under `out_dir/warmup/`, training it only if absent."""
    path = folder(out_dir, settings)
    if is_cached(out_dir, settings):
        logger.info("reusing the warm-up model in %s", path)
        return path
    model, tok = train(settings, progress=progress, on_step=on_step)
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
