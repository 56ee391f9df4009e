"""Fork value: which forks changed the outcome, measured by branching with the run's own policy and reward.

At a position s of a recorded completion, for the sampled token and its alternatives a (the top-k stored at a fork,
else the policy's own top-k; plus "any other token" when the rest of the probability is large), `measure` rolls out m
continuations of prompt + completion[:s] + a with the policy at the run's sampling settings (temperature, top-p,
top-k, min-p, repetition penalty, max completion length, stop tokens: `Sampling`, read from TRL's trainer or its
config), scores the finished completions with the run's reward functions as TRL calls them (`RewardFunctions`), and
estimates Q, V and the fork value (plugin/fork_value_stats.py; docs/methods.md, "Fork value").

Costs, for P positions of C completions, K branches each and m rollouts: C forwards of the policy (one per
completion, logits kept only at the measured positions), ⌈P·K·m / batch_rows⌉ batched `generate` calls (rollouts
whose branch token ends the completion need none), one call of each reward function. `Measurement.cost` counts them.

Guarantees: no gradient (`torch.no_grad`); the model's train/eval mode is restored; everything random (the
rollouts' sampling, the "other" branch's tokens, the estimates' resampling) is drawn from forkwatch's own seeded
generators inside `torch.random.fork_rng`, so the caller's RNG state (CPU, and every CUDA device in use; Python's and
numpy's global generators too, which a reward function may draw from) is the same after the call as before it, and
the same seed gives the same measurement. Nothing here imports the rest of plugin/.

Sharded weights (FSDP2, DeepSpeed ZeRO-3): every forward of the model is a collective, so every rank must make the
same calls. `measure(..., lockstep=f)` then asks `f(n)` for the largest n over the ranks before each kind of call
(π's forwards, the rollouts' `generate` calls) and makes up the difference with one-token calls, and `generate` runs
with `synced_gpus=True` (transformers keeps every rank stepping until all are done, as TRL's own generation does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from forkwatch.plugin.fork_value_stats import PositionEstimate, estimate_position

logger = logging.getLogger(__name__)

SAMPLED, ALTERNATIVE, OTHER = "sampled", "alternative", "other"  # the `branch` column's values


@dataclass(frozen=True)
class Sampling:
    """How the run sampled its completions: the fields of TRL's generation config that shape the distribution."""

    max_completion_length: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    bos_token_id: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = 0
    min_p: float | None = None
    repetition_penalty: float = 1.0

    # GRPOConfig fields this class reads; anything in `generation_kwargs` beyond them is refused (it could change
    # the sampling distribution in a way π here would not know)
    KNOWN = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_completion_length")

    @classmethod
    def settings_of(cls, trainer: Any) -> dict[str, Any]:
        """The KNOWN settings GRPOTrainer generates with, GRPOConfig-named: its `generation_config` (GRPOConfig's
        fields with `generation_kwargs` applied over them, as TRL builds it) where it has one, else its attributes.
        run.json records them under "trainer" (the offline path reads them back)."""
        gen = getattr(trainer, "generation_config", None)
        out = {}
        for name in cls.KNOWN:
            value = getattr(trainer, name, None)
            if gen is not None and name != "max_completion_length":
                value = getattr(gen, name, value)
            elif gen is not None and getattr(gen, "max_new_tokens", None) is not None:
                value = gen.max_new_tokens  # generation_kwargs' max_new_tokens wins over max_completion_length
            out[name] = value
        return out

    @classmethod
    def from_trainer(cls, trainer: Any) -> Sampling:
        """The settings GRPOTrainer generates with (`settings_of`, and its `eos_token_ids`)."""
        args = trainer.args
        extra = set(args.generation_kwargs or {}) - {"max_new_tokens", *cls.KNOWN}
        if extra or getattr(trainer, "use_vllm", False):
            what = f"generation_kwargs {sorted(extra)}" if extra else "vLLM generation"
            raise ValueError(f"fork value: {what} is not supported: the rollouts must sample from the same "
                             "distribution as training; remove it or measure without fork value")
        tok = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)  # a processor holds one
        s = cls.settings_of(trainer)
        return cls(max_completion_length=int(s["max_completion_length"]), eos_token_ids=tuple(trainer.eos_token_ids),
                   pad_token_id=int(tok.pad_token_id), bos_token_id=tok.bos_token_id,
                   temperature=float(s["temperature"]), top_p=float(1.0 if s["top_p"] is None else s["top_p"]),
                   top_k=s["top_k"], min_p=s["min_p"],
                   repetition_penalty=float(1.0 if s["repetition_penalty"] is None else s["repetition_penalty"]))

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], *, model: Any, tokenizer: Any) -> Sampling:
        """From GRPOConfig-named `settings` (e.g. run.json's "trainer"; GRPOConfig's defaults for the absent ones),
        resolving the stop tokens as GRPOTrainer does (the tokenizer's EOS first, then the model's)."""
        unknown = set(settings) - set(cls.KNOWN)
        if unknown:
            raise ValueError(f"unknown sampling setting(s) {sorted(unknown)}: use {', '.join(cls.KNOWN)}")
        eos = model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if tokenizer.eos_token_id not in eos:
            eos = [tokenizer.eos_token_id, *eos]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        base = cls(max_completion_length=int(settings.get("max_completion_length") or 512),
                   eos_token_ids=tuple(int(e) for e in eos), pad_token_id=int(pad), bos_token_id=tokenizer.bos_token_id)
        chosen = {k: settings[k] for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
                  if settings.get(k) is not None}
        return cls(**{**{f.name: getattr(base, f.name) for f in fields(cls)}, **chosen})

    def generation_config(self, max_new_tokens: int) -> Any:
        """The GenerationConfig GRPOTrainer builds from these settings, for `max_new_tokens`."""
        from transformers import GenerationConfig

        return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=True, pad_token_id=self.pad_token_id,
                                bos_token_id=self.bos_token_id, eos_token_id=list(self.eos_token_ids),
                                temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                                repetition_penalty=self.repetition_penalty, disable_compile=True)

    def processors(self) -> Any:
        """The logits processors `generate` applies for these settings, in its order (transformers'
        `_get_logits_processor`): repetition penalty, then temperature, top-k, top-p, min-p."""
        from transformers import (
            LogitsProcessorList,
            MinPLogitsWarper,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        out = LogitsProcessorList()
        if self.repetition_penalty is not None and self.repetition_penalty != 1.0:
            out.append(RepetitionPenaltyLogitsProcessor(penalty=self.repetition_penalty))
        if self.temperature is not None and self.temperature != 1.0:
            out.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k is not None and self.top_k != 0:
            out.append(TopKLogitsWarper(top_k=self.top_k, min_tokens_to_keep=1))
        if self.top_p is not None and self.top_p < 1.0:
            out.append(TopPLogitsWarper(top_p=self.top_p, min_tokens_to_keep=1))
        if self.min_p is not None:
            out.append(MinPLogitsWarper(min_p=self.min_p, min_tokens_to_keep=1))
        return out


def _noop(*_: Any, **__: Any) -> None:
    return None


@dataclass
class RewardFunctions:
    """The run's reward functions, called as GRPOTrainer calls them (`_calculate_rewards`): a callable gets
    prompts=, completions=, completion_ids= and the prompt's extra dataset columns as keyword lists, plus
    trainer_state, log_extra, log_metric; a reward model scores prompt + completion through its processing class;
    None becomes NaN; the total is the weighted sum, NaN ignored."""

    funcs: list[Any]
    weights: np.ndarray
    processing_classes: list[Any]
    names: list[str]
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_trainer(cls, trainer: Any) -> RewardFunctions:
        return cls(list(trainer.reward_funcs), trainer.reward_weights.detach().cpu().numpy().astype(np.float64),
                   list(trainer.reward_processing_classes), list(trainer.reward_func_names),
                   dict(getattr(trainer, "chat_template_kwargs", None) or {}))

    @classmethod
    def of(cls, funcs: Sequence[Callable], weights: Sequence[float] | None = None) -> RewardFunctions:
        """Plain reward callables (the offline path), weighted 1 each unless `weights` says otherwise."""
        if not funcs:
            raise ValueError("pass at least one reward function")
        w = np.ones(len(funcs)) if weights is None else np.asarray(weights, dtype=np.float64)
        if w.shape != (len(funcs),):
            raise ValueError(f"{len(w)} reward weight(s) for {len(funcs)} reward function(s): give one per function")
        return cls(list(funcs), w, [None] * len(funcs), [getattr(f, "__name__", type(f).__name__) for f in funcs])

    def score(self, prompts: list[Any], completions: list[Any], completion_ids: list[list[int]],
              columns: Mapping[str, list[Any]], state: Any = None) -> np.ndarray:
        """The weighted total reward of each (prompt, completion), (N,) float64."""
        from trl.data_utils import apply_chat_template, is_conversational
        from trl.trainer.utils import is_async_callable

        kwargs = {**columns, "trainer_state": state, "log_extra": _noop, "log_metric": _noop}
        per_func = np.full((len(prompts), len(self.funcs)), np.nan)
        for i, (func, proc) in enumerate(zip(self.funcs, self.processing_classes, strict=True)):
            if isinstance(func, torch.nn.Module):
                if is_conversational({"prompt": prompts[0]}):
                    texts = [apply_chat_template({"messages": p + c}, proc, **self.chat_template_kwargs)["text"]
                             for p, c in zip(prompts, completions, strict=True)]
                else:
                    texts = [p + c for p, c in zip(prompts, completions, strict=True)]
                device = next(func.parameters()).device
                enc = proc(text=texts, return_tensors="pt", padding=True, padding_side="right",
                           add_special_tokens=False)
                with torch.inference_mode():
                    out = func(**{k: v.to(device) for k, v in enc.items()}).logits[:, 0]
                per_func[:, i] = out.float().cpu().numpy()
                continue
            call = dict(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
            out = asyncio.run(func(**call)) if is_async_callable(func) else func(**call)
            if len(out) != len(prompts):
                raise ValueError(f"reward function {self.names[i]!r} returned {len(out)} rewards for {len(prompts)} "
                                 "completions: return one per completion")
            per_func[:, i] = [np.nan if r is None else float(r) for r in out]
        return np.nansum(per_func * self.weights, axis=1)


@dataclass(frozen=True)
class Position:
    """One position to measure: the completion as the model saw it and as the reward functions get it."""

    prompt_ids: tuple[int, ...]  # the prompt's tokens as generation saw them (chat template applied)
    completion_ids: tuple[int, ...]  # the recorded completion's tokens (at least position + 1)
    position: int  # 0-based index in the completion of the token whose alternatives are measured
    prompt: Any  # the prompt as TRL gives it to the reward functions (text, or a list of chat messages)
    columns: Mapping[str, Any] = field(default_factory=dict)  # the prompt's extra dataset columns
    alternatives: tuple[int, ...] | None = None  # the top-k ids stored at a fork; None: the policy's own top-k
    step: int = 0
    completion_id: int = 0
    stratum: str = ""
    inclusion_prob: float = 1.0


@dataclass(frozen=True)
class ForkValueSettings:
    # --- the budget: positions x branches x rollouts ---
    branches: int = field(default=5, metadata={"help": "Candidate tokens per position: the top-k at the sampling "
                                               "settings (forks keep their stored top-k); the sampled token is "
                                               "always a branch, added when it is not among them."})
    rollouts: int = field(default=8, metadata={"help": "Continuations per branch (m >= 2: the estimate splits them "
                                               "in halves)."})
    other_mass: float = field(default=0.05, metadata={"help": "Measure an 'any other token' branch when the "
                                                      "probability outside the branches is at least this; below, V "
                                                      "and the value are normalised over the measured mass."})
    batch_rows: int = field(default=256, metadata={"help": "Rollouts per `generate` call (the memory bound)."})
    # --- the estimates (plugin/fork_value_stats.py) ---
    min_value: float = field(default=0.05, metadata={"help": "A position is consequential when its fork value is "
                                                     "above this (reward units) at one-sided 95 % confidence."})
    reward_range: tuple[float, float] | None = field(default=None, metadata={
        "help": "(lo, hi) bounds of the reward for Q's interval; None: the measurement's lowest and highest reward."})
    splits: int = field(default=8, metadata={"help": "Random halvings averaged in the cross-fitted value."})
    bootstrap: int = field(default=100, metadata={"help": "Bootstrap resamples for the value's SE."})
    permutations: int = field(default=200, metadata={"help": "Permutations of the no-effect test."})

    def __post_init__(self) -> None:
        if self.branches < 1:
            raise ValueError(f"branches={self.branches!r}: pass an integer >= 1")
        if self.rollouts < 2:
            raise ValueError(f"rollouts={self.rollouts!r}: pass an integer >= 2 (the estimate splits them in halves)")
        if not 0.0 < self.other_mass <= 1.0:
            raise ValueError(f"other_mass={self.other_mass!r}: pass a probability in (0, 1], e.g. 0.05")
        if self.batch_rows < 1:
            raise ValueError(f"batch_rows={self.batch_rows!r}: pass an integer >= 1")
        if self.reward_range is not None and not self.reward_range[0] <= self.reward_range[1]:
            raise ValueError(f"reward_range={self.reward_range!r}: pass (lo, hi) with lo <= hi")


@dataclass
class Cost:
    """What one measurement cost, counted (not timed): model calls and the token positions they processed,
    padding included."""

    forward_calls: int = 0  # the policy forwards that gave π
    forward_tokens: int = 0
    generate_calls: int = 0
    rollouts: int = 0  # continuations rolled out (branches x rollouts, summed over positions)
    terminal_rollouts: int = 0  # of which needed no generation (the branch token ended the completion)
    prefill_tokens: int = 0  # generate's first forward: rows x padded input length
    decode_tokens: int = 0  # generate's later forwards: rows x new tokens (a cached forward per token)
    reward_calls: int = 0


@dataclass
class Measurement:
    columns: dict[str, np.ndarray]  # the `fork_values` columns but run_id, source and measurement; one row per branch
    estimates: list[PositionEstimate]  # one per position, in the order given
    rewards: list[np.ndarray]  # per position, (branches, rollouts): every rollout's total reward
    pi: list[np.ndarray]  # per position, (branches,)
    cost: Cost
    reward_range: tuple[float, float]


@contextlib.contextmanager
def own_rng(seed: int) -> Iterator[None]:
    """Run the body on a generator seeded with `seed`, then put back the caller's RNG states: the CPU's and, when
    CUDA is in use, every device's (all are forked because seeding touches all), and Python's and numpy's global
    generators (the body's reward functions may draw from them)."""
    import random

    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if cuda else []):
            torch.random.default_generator.manual_seed(seed)
            if cuda:
                torch.cuda.manual_seed_all(seed)  # CUDA already initialised: seeds now, not lazily after the fork
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


Lockstep = Callable[[int], int]  # n calls on this rank -> the most any rank makes (sharded weights: module docstring)


def _idle_forward(model: Any, sampling: Sampling, device: Any) -> None:
    """A one-token forward that keeps this rank in step with the others' collectives (its output is unused)."""
    model(input_ids=torch.full((1, 1), sampling.pad_token_id, device=device), logits_to_keep=1)


@dataclass
class _Branches:
    tokens: list[int]  # token id per branch; -1 for "other"
    kinds: list[str]
    pi: list[float]
    sampled: int  # index of the sampled token's branch
    rest: torch.Tensor | None  # the "other" branch's distribution over the vocabulary (renormalised), or None


@torch.no_grad()
def _plan(model: Any, positions: Sequence[Position], sampling: Sampling, settings: ForkValueSettings,
          cost: Cost, lockstep: Lockstep | None = None) -> list[_Branches]:
    """π at every position, from one forward per completion (logits kept at the measured positions only), with the
    sampling settings' processors; then each position's branches."""
    device = next(model.parameters()).device
    processors = sampling.processors()
    by_completion: dict[tuple, list[int]] = {}
    for i, p in enumerate(positions):
        if not 0 <= p.position < len(p.completion_ids):
            raise ValueError(f"position {p.position} is outside its completion of {len(p.completion_ids)} tokens")
        if not p.prompt_ids:
            raise ValueError("a position's prompt has no tokens: the first completion token needs a context")
        by_completion.setdefault((p.prompt_ids, p.completion_ids), []).append(i)
    plans: list[_Branches | None] = [None] * len(positions)
    # agreed before any forward: under FSDP2 each forward is itself a collective, so a rank asking after its own
    # forwards would wait in the all-reduce while another still waits in a forward's all-gather
    calls = len(by_completion) if lockstep is None else lockstep(len(by_completion))
    for (prompt_ids, completion_ids), members in by_completion.items():
        last = max(positions[i].position for i in members)
        ids = torch.tensor([*prompt_ids, *completion_ids[:last]], device=device)
        at = sorted({len(prompt_ids) + positions[i].position - 1 for i in members})
        logits = model(input_ids=ids[None], logits_to_keep=torch.tensor(at, device=device)).logits[0]  # (len(at), V)
        cost.forward_calls += 1
        cost.forward_tokens += ids.numel()
        for i in members:
            p = positions[i]
            row = at.index(len(prompt_ids) + p.position - 1)
            scores = processors(ids[None, : len(prompt_ids) + p.position], logits[row: row + 1].float())
            probs = torch.softmax(scores[0], dim=-1)  # (V,)
            plans[i] = _branches(probs, p, settings)
    for _ in range(calls - len(by_completion)):
        _idle_forward(model, sampling, device)
    return plans  # type: ignore[return-value]


def _branches(probs: torch.Tensor, p: Position, settings: ForkValueSettings) -> _Branches:
    """The sampled token, the alternatives (stored or the top-k) with π > 0, and "other" when the rest is large."""
    sampled = int(p.completion_ids[p.position])
    alts = list(p.alternatives) if p.alternatives is not None else \
        probs.topk(min(settings.branches, probs.numel())).indices.tolist()
    tokens = [t for t in dict.fromkeys(alts) if t != sampled and 0 <= t < probs.numel() and probs[t] > 0]
    tokens = [sampled, *tokens]  # the sampled token is the first branch, even at π = 0 (a checkpoint unlike the run)
    pi = [float(probs[t]) for t in tokens]
    kinds = [SAMPLED] + [ALTERNATIVE] * (len(tokens) - 1)
    rest = None
    remainder = 1.0 - sum(pi)
    if remainder >= settings.other_mass:
        rest = probs.clone()
        rest[tokens] = 0.0
        rest = rest / rest.sum()
        tokens.append(-1)
        kinds.append(OTHER)
        pi.append(remainder)
    return _Branches(tokens, kinds, pi, 0, rest)


def _rollouts(model: Any, starts: list[list[int]], budgets: list[int], sampling: Sampling, settings: ForkValueSettings,
              cost: Cost, on_rollouts: Callable[[int], None] | None, lockstep: Lockstep | None = None
              ) -> list[list[int]]:
    """Continue each `starts` row (prompt + completion so far + branch token) by at most its budget of tokens, cut
    after the first stop token, in batched `generate` calls of rows of similar length. -> the new tokens per row."""
    device = next(model.parameters()).device
    eos = set(sampling.eos_token_ids)
    out: list[list[int]] = [[] for _ in starts]
    todo = [i for i, b in enumerate(budgets) if b > 0]
    cost.terminal_rollouts += len(starts) - len(todo)
    if on_rollouts is not None and len(starts) > len(todo):
        on_rollouts(len(starts) - len(todo))
    todo.sort(key=lambda i: (budgets[i], len(starts[i])), reverse=True)  # rows of one call finish together
    chunks = [todo[c: c + settings.batch_rows] for c in range(0, len(todo), settings.batch_rows)]
    synced = {} if lockstep is None else {"synced_gpus": True}
    if lockstep is not None:  # one-token calls make up the other ranks' extra generate calls
        chunks += [None] * (lockstep(len(chunks)) - len(chunks))
    for chunk in chunks:
        if chunk is None:
            ids = torch.full((1, 1), sampling.pad_token_id, device=device)
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                           generation_config=sampling.generation_config(1), **synced)
            continue
        width = max(len(starts[i]) for i in chunk)
        ids = torch.full((len(chunk), width), sampling.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, i in enumerate(chunk):  # left-padded, as GRPOTrainer pads its prompts
            ids[r, width - len(starts[i]):] = torch.tensor(starts[i])
            mask[r, width - len(starts[i]):] = 1
        new = max(budgets[i] for i in chunk)
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             generation_config=sampling.generation_config(new), **synced)[:, width:].cpu()
        cost.generate_calls += 1
        cost.prefill_tokens += ids.numel()
        cost.decode_tokens += len(chunk) * max(gen.size(1) - 1, 0)
        for r, i in enumerate(chunk):
            tokens = gen[r, : budgets[i]].tolist()  # a row's own budget: what generate would have given it alone
            stop = next((k for k, t in enumerate(tokens) if t in eos), None)
            out[i] = tokens if stop is None else tokens[: stop + 1]
        if on_rollouts is not None:
            on_rollouts(len(chunk))
    return out


def _completion_texts(tokenizer: Any, positions: Sequence[Position], owners: list[int],
                      completion_ids: list[list[int]]) -> list[Any]:
    """The completions as GRPOTrainer hands them to reward functions: decoded without special tokens; for a chat
    prompt, one assistant message (parsed with the tokenizer's response schema when it has one)."""
    from trl.data_utils import is_conversational

    chat = is_conversational({"prompt": positions[owners[0]].prompt})
    if chat and (getattr(tokenizer, "response_template", None) is not None
                 or getattr(tokenizer, "response_schema", None) is not None):
        from trl.chat_template_utils import parse_response

        return [[parse_response(tokenizer, ids, prefix=list(positions[o].prompt_ids))]
                for o, ids in zip(owners, completion_ids, strict=True)]
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return [[{"role": "assistant", "content": t}] for t in texts] if chat else texts


def measure(model: Any, tokenizer: Any, positions: Sequence[Position], *, sampling: Sampling,
            rewards: RewardFunctions, settings: ForkValueSettings, seed: int, state: Any = None,
            on_rollouts: Callable[[int], None] | None = None, lockstep: Lockstep | None = None) -> Measurement:
    """Measure the fork value of every position (module docstring): one row per branch in `columns`. `seed` makes the
    measurement reproducible; `state` is what reward functions get as `trainer_state`; `on_rollouts(n)` is told of every
    n rollouts done (the CLI draws the bar); `lockstep`: under sharded weights, keeps this rank's model calls in step
    with the other ranks' (module docstring; every rank calls `measure`, with or without positions)."""
    cost = Cost()
    if not positions and lockstep is None:
        return Measurement(_columns([], [], [], []), [], [], [], cost, (0.0, 0.0))
    was_training = model.training
    model.eval()
    try:
        with own_rng(seed), torch.no_grad():
            plans = _plan(model, positions, sampling, settings, cost, lockstep)
            owners, branch_of, starts, budgets, firsts = [], [], [], [], []
            for i, (p, plan) in enumerate(zip(positions, plans, strict=True)):
                prefix = [*p.prompt_ids, *p.completion_ids[: p.position]]
                left = sampling.max_completion_length - p.position - 1
                for b, token in enumerate(plan.tokens):
                    drawn = torch.multinomial(plan.rest, settings.rollouts, replacement=True).tolist() \
                        if token == -1 else [token] * settings.rollouts
                    for t in drawn:
                        owners.append(i)
                        branch_of.append(b)
                        firsts.append(t)
                        starts.append([*prefix, t])
                        budgets.append(0 if t in sampling.eos_token_ids else left)
            cost.rollouts = len(starts)
            tails = _rollouts(model, starts, budgets, sampling, settings, cost, on_rollouts, lockstep)
    finally:
        model.train(was_training)
    if not positions:  # a rank without positions that only kept in step with the others
        return Measurement(_columns([], [], [], []), [], [], [], cost, (0.0, 0.0))
    completion_ids = [[*positions[o].completion_ids[: positions[o].position], f, *tail]
                      for o, f, tail in zip(owners, firsts, tails, strict=True)]
    texts = _completion_texts(tokenizer, positions, owners, completion_ids)
    column_names = sorted({k for p in positions for k in p.columns})
    columns = {k: [positions[o].columns.get(k) for o in owners] for k in column_names}
    with own_rng(seed + 1):  # a reward function's own draws leave the caller's generators alone too
        total = rewards.score([positions[o].prompt for o in owners], texts, completion_ids, columns, state)
    cost.reward_calls += 1
    lo, hi = settings.reward_range or (float(np.nanmin(total)), float(np.nanmax(total)))
    rng = np.random.default_rng([seed, 0x5EED])  # the estimates' resampling: numpy's own generator
    estimates, per_position = [], []
    owners_a, branch_a = np.asarray(owners), np.asarray(branch_of)
    for i, plan in enumerate(plans):
        r = np.stack([total[(owners_a == i) & (branch_a == b)] for b in range(len(plan.tokens))])  # (K, m)
        per_position.append(r)
        estimates.append(estimate_position(np.asarray(plan.pi), r, sampled=plan.sampled, reward_range=(lo, hi),
                                           rng=rng, min_value=settings.min_value, splits=settings.splits,
                                           bootstrap=settings.bootstrap, permutations=settings.permutations))
    return Measurement(_columns(positions, plans, estimates, [settings.rollouts] * len(positions)), estimates,
                       per_position, [np.asarray(p.pi) for p in plans], cost, (lo, hi))


def _columns(positions: Sequence[Position], plans: list[_Branches], estimates: list[PositionEstimate],
             rollouts: list[int]) -> dict[str, np.ndarray]:
    """One row per branch: the branch's own values, then its position's, repeated."""
    rows: dict[str, list] = {k: [] for k in (
        "step", "completion_id", "position", "token_id", "branch", "branch_token_id", "pi", "q", "n", "se", "q_lo",
        "q_hi", "v", "v_se", "v_lo", "v_hi", "value", "value_se", "p_value", "consequential", "spread",
        "sampled_advantage", "mass",
        "stratum", "inclusion_prob")}
    for p, plan, e, m in zip(positions, plans, estimates, rollouts, strict=True):
        k = len(plan.tokens)
        per_position = {"step": p.step, "completion_id": p.completion_id, "position": p.position,
                        "token_id": p.completion_ids[p.position], "v": e.v, "v_se": e.v_se, "v_lo": e.v_lo,
                        "v_hi": e.v_hi, "value": e.value,
                        "value_se": e.value_se, "p_value": e.p_value, "consequential": e.consequential,
                        "spread": e.spread, "sampled_advantage": e.sampled_advantage, "mass": e.mass,
                        "stratum": p.stratum, "inclusion_prob": p.inclusion_prob, "n": m}
        for name, value in per_position.items():
            rows[name] += [value] * k
        rows["branch"] += plan.kinds
        rows["branch_token_id"] += [None if t == -1 else t for t in plan.tokens]
        rows["pi"] += plan.pi
        rows["q"] += e.branches.q.tolist()
        rows["se"] += e.branches.se.tolist()
        rows["q_lo"] += e.branches.lo.tolist()
        rows["q_hi"] += e.branches.hi.tolist()
    out: dict[str, Any] = {}
    for name, values in rows.items():
        if name in ("branch", "stratum"):
            out[name] = np.asarray(values, dtype=object)
        elif name == "branch_token_id":
            out[name] = values  # a list: None (the "other" branch) is stored as NULL
        else:
            out[name] = np.asarray(values)
    return out
