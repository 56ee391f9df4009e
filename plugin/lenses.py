"""The collapse lenses that need the model (docs/collapse-lenses.md): probes scored teacher-forced every few steps,
and the cadence of the effective rank of hidden states. (The entropy spectrum needs no model: the steps row builds
it, plugin/handoff.py.)

Probes: fixed (prompt, completion) pairs scored teacher-forced, without gradient, every few steps. Each step samples
new completions, so a recorded token is never scored twice; a probe's tokens are, at every `probe_every` steps,
with the policy as it is then: their entropy, Rényi-2, log-prob and top-k, in the `probes` table (arXiv:2506.01939
reports that 86 % of the high-entropy positions are shared before and after RLVR). Given explicitly
(`attach(..., probes=[(prompt, completion), ...])`) or, by default, the first completions recorded. Probes share
padded forwards (explicit position ids: a plain forward does not derive positions from a padded mask;
`BATCH_LOGITS` bounds the logits of one), through the causal LM itself, so the stack's own forward hooks gather
sharded weights (ZeRO-3, FSDP2): every rank must score the same probes the same number of times, which the callback
guarantees by broadcasting them and scoring on all ranks.

Effective rank (arXiv:2509.23808, `token_math.effective_rank`): every `effective_rank_every` steps, of up to
`effective_rank_completions` recorded completions per rank, from the loss pass's own backbone output
(`EffectiveRankBudget`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from forkwatch.plugin import token_math
from forkwatch.plugin.trl_seams import target_model


@dataclass(frozen=True)
class Probe:
    probe_id: int
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]

    def to_meta(self, tokenizer=None) -> dict:
        """What run.json says about the probe: its id, token counts and, with a tokenizer, its text."""
        out = {"probe_id": self.probe_id, "prompt_tokens": len(self.prompt_ids),
               "completion_tokens": len(self.completion_ids)}
        if tokenizer is not None:
            out["prompt"] = tokenizer.decode(list(self.prompt_ids), skip_special_tokens=False)
            out["completion"] = tokenizer.decode(list(self.completion_ids), skip_special_tokens=False)
        return out


def encode_probes(pairs: list[tuple[str, str]], tokenizer) -> list[Probe]:
    """Probes from (prompt, completion) texts. The prompt is taken as the model reads it (apply any chat template
    before passing it); neither part gets special tokens added."""
    out = []
    for i, (prompt, completion) in enumerate(pairs):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"]
        if not p or not c:
            raise ValueError(f"probes[{i}]: the prompt and the completion must each encode to at least one token "
                             f"(got {len(p)} and {len(c)}); pass non-empty texts")
        out.append(Probe(i, tuple(p), tuple(c)))
    return out


def probe_from_row(probe_id: int, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
                   length: int) -> Probe | None:
    """A probe from one generated row: the prompt's unpadded ids, the completion's first `length` tokens (up to and
    including its EOS). None for an empty completion."""
    p = prompt_ids[prompt_mask.bool()].tolist()
    c = completion_ids[: int(length)].tolist()
    return Probe(probe_id, tuple(p), tuple(c)) if p and c else None


BATCH_LOGITS = 2**25  # logits (probes x longest completion x vocabulary) one forward may produce: 128 MB of float32


@torch.no_grad()
def score_probes(model: torch.nn.Module, probes: list[Probe], step: int, *, temperature: float, k: int,
                 device: torch.device | str) -> dict[str, list]:
    """Score each probe with `model` (a causal LM) -> columns of the `probes` table (without run_id), one row per
    completion token of each probe. The model is put in eval mode for the forwards and restored after.

    The probes go through as few forwards as `BATCH_LOGITS` allows (`padded_batch`; one on a small model, where the
    per-forward dispatch, not the arithmetic, is the cost of a scoring; one per probe when a probe's logits alone
    reach the bound). A probe's logits are those of its own unpadded forward: each row sees exactly its own tokens
    at its own positions (tests/plugin/test_plugin_probes.py checks them against one forward per probe)."""
    cols: dict[str, list] = {c: [] for c in ("step", "probe_id", "position", "token_id", "logprob", "entropy",
                                             "renyi2", "top_ids", "top_probs")}
    if not probes:
        return cols
    vocab = getattr(model.config.get_text_config(), "vocab_size", None) or 1
    was_training = model.training
    model.eval()
    scores = []
    try:
        for group in _groups(probes, vocab):
            ids, mask, positions, width = padded_batch(group, device)
            # logits at columns P-1 … P+T-2 (P the longest prompt) predict completion tokens 0 … T-1 of each probe
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                           logits_to_keep=width + 1).logits[:, :-1]  # (n, width, V)
            keep = torch.zeros(len(group), width, dtype=torch.bool)
            for i, probe in enumerate(group):
                keep[i, : len(probe.completion_ids)] = True
            keep = keep.to(logits.device)
            scores.append(token_math.teacher_forced(logits[keep], ids[:, -width:][keep], temperature=temperature,
                                                   k=k))
    finally:
        model.train(was_training)
    for probe in probes:
        t = len(probe.completion_ids)
        cols["step"] += [step] * t
        cols["probe_id"] += [probe.probe_id] * t
        cols["position"] += list(range(t))
        cols["token_id"] += list(probe.completion_ids)
    for name in ("logprob", "entropy", "renyi2", "top_ids", "top_probs"):
        cols[name] = torch.cat([getattr(s, name) for s in scores]).cpu().tolist()
    return cols


def _groups(probes: list[Probe], vocab: int) -> list[list[Probe]]:
    """The probes in order, cut into forwards whose logits (count x longest completion x vocab) stay within
    BATCH_LOGITS (a probe over it alone gets a forward of its own). The same on every rank: the probes are."""
    groups: list[list[Probe]] = []
    width = 0
    for probe in probes:
        t = len(probe.completion_ids) + 1
        if groups and (len(groups[-1]) + 1) * max(width, t) * vocab <= BATCH_LOGITS:
            groups[-1].append(probe)
            width = max(width, t)
        else:
            groups.append([probe])
            width = t
    return groups


def padded_batch(probes: list[Probe], device: torch.device | str) -> tuple[torch.Tensor, ...]:
    """The probes as one (n, P + T) batch, P the longest prompt and T the longest completion: each prompt
    left-padded to end at column P, each completion right-padded after it, so every probe's completion logits are
    the batch's last T + 1 columns (`logits_to_keep`). The attention mask hides the padding and the position ids
    count from each probe's first real token, as in its own unpadded forward. -> ids, mask, position ids, T."""
    p = max(len(x.prompt_ids) for x in probes)
    t = max(len(x.completion_ids) for x in probes)
    ids = torch.zeros(len(probes), p + t, dtype=torch.long)
    mask = torch.zeros(len(probes), p + t, dtype=torch.long)
    for i, x in enumerate(probes):
        a, b = p - len(x.prompt_ids), p + len(x.completion_ids)
        ids[i, a:b] = torch.tensor(x.prompt_ids + x.completion_ids)
        mask[i, a:b] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device), t


class ProbeRunner:
    """When and what to score, for one trainer: the probes given at attach, or the first `count` completions this
    run records (rank 0's, broadcast so that every rank scores the same probes: the forwards are collectives under
    ZeRO-3 and FSDP2). Due at the first step with probes and then every `every` steps."""

    def __init__(self, trainer, *, pairs: list[tuple[str, str]] | None, every: int, count: int, top_k: int) -> None:
        self.trainer, self.every, self.count, self.top_k = trainer, every, count, top_k
        proc = trainer.processing_class
        self.tokenizer = getattr(proc, "tokenizer", proc)
        self.probes: list[Probe] | None = encode_probes(pairs, self.tokenizer) if pairs else None
        self.scored = False  # scored at least once this run (the first scoring is always due)
        self._model: torch.nn.Module | None = None  # the causal LM, resolved once (unwrapping costs milliseconds)

    def due(self, step: int) -> bool:
        return self.every > 0 and (not self.scored or step % self.every == 0)

    def take_defaults(self, gen) -> bool:
        """Make the first `count` recorded completions of `gen` (a GenBatch, or None on a rank without one) the
        probes, unless probes exist already. Called on every rank at the same step. -> whether there are probes."""
        if self.probes is not None:
            return True
        found: list[Probe] = []
        if gen is not None and self.trainer.accelerator.process_index == 0:
            rows = gen.sampled.nonzero().squeeze(1).tolist()
            for row in rows:
                if len(found) == self.count:
                    break
                probe = probe_from_row(len(found), gen.prompt_ids[row], gen.prompt_mask[row],
                                       gen.completion_ids[row], int(gen.length[row]))
                if probe is not None:
                    found.append(probe)
        if self.trainer.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            found = broadcast_object_list([found], from_process=0)[0]
        self.probes = found or None
        return self.probes is not None

    def score(self, step: int) -> dict[str, list]:
        """Score every probe with the policy as it is now (all ranks) -> the `probes` columns."""
        self.scored = True
        tr = self.trainer
        if self._model is None:  # accelerate's unwrap_model re-reads package metadata on every call
            self._model = target_model(tr)
        model = self._model
        try:
            return score_probes(model, self.probes or [], step, temperature=tr.temperature, k=self.top_k,
                                device=tr.accelerator.device)
        finally:
            reshard(model)

    def meta(self) -> list[dict]:
        """run.json's `probes`: each probe's id, token counts and text."""
        return [p.to_meta(self.tokenizer) for p in self.probes or []]


def reshard(model: torch.nn.Module) -> None:
    """Under FSDP2, free the parameters a forward without backward left gathered: the root unit does not reshard
    after its forward (the backward that would comes only in training), so after the probes the full embedding and
    LM head would stay in memory until the next training step. A no-op elsewhere (ZeRO-3 releases after each
    module's forward by itself)."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


class EffectiveRankBudget:
    """At which steps the effective rank of hidden states is measured (`effective_rank_every`), and of how many
    recorded completions per rank and step (`effective_rank_completions`), over the step's micro-batches."""

    def __init__(self, every: int, completions: int) -> None:
        self.every, self.completions = every, completions
        self._left: dict[int, int] = {}  # step -> completions whose effective rank this rank may still measure

    def due(self, step: int) -> bool:
        """Whether the effective rank is measured at `step` (the backbone is hooked for it)."""
        return self.every > 0 and step % self.every == 0 and self._left.get(step, 1) > 0

    def measure(self, step: int, hidden: torch.Tensor, mask: torch.Tensor, recorded: torch.Tensor) -> torch.Tensor:
        """Effective rank of up to the step's remaining budget of the `recorded` (B,) rows, from the loss pass's
        backbone output `hidden` (B, P + T, H) (full activations under every sharded stack: only parameters are
        sharded); `mask` (B, T) marks each completion's tokens, the last T positions. -> (n,) float32."""
        left = self._left.setdefault(step, self.completions)
        rows = recorded.nonzero().squeeze(1)[:left].tolist()
        self._left[step] = left - len(rows)
        for old in [s for s in self._left if s < step]:
            del self._left[old]
        t = mask.size(1)
        values = token_math.effective_ranks(hidden[rows, -t:], mask[rows]) if rows else []
        return torch.tensor(values, dtype=torch.float32, device=mask.device)
