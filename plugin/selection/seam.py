"""The selection seam: TRL's `get_high_entropy_mask` answered by the configured selector (methods.py), the selector's
loss term, the selection's metrics and diagnostics, the steps whose selection kept nothing, and forkwatch's
selection generator across a resume.

The selection is part of the objective, so nothing here is guarded: it is either computed or training stops with an
error naming the cause. Only the recording of its metrics is guarded (a fault there never changes the weights).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from forkwatch.plugin import token_math
from forkwatch.plugin.token_math import no_grad
from forkwatch.plugin.trl_seams import GROUP_ID, GROUP_JS, REFERENCE_JS, response_mask
from forkwatch.store.ledger import Ledger

logger = logging.getLogger(__name__)


class SelectionSeam:
    """The seam's state for one trainer: the bound selector, its generator, and what each step's selection kept.
    Everything it computes is done by the pure functions below, which take TRL's micro-batch and plain values."""

    def __init__(self, trainer, config, selector: Any, *, rank: int, world: int, faults: Ledger) -> None:
        self.trainer, self.config, self.selector = trainer, config, selector
        self.rank, self.world, self.faults = rank, world, faults
        # the selectors' generator (random selectors), seeded per rank; saved with each checkpoint
        self.generator = torch.Generator(device=trainer.accelerator.device).manual_seed(config.seed + rank)
        # per step: `selection_totals` summed on the device over the step's micro-batches, read once at its end
        self._totals: dict[int, torch.Tensor] = {}

    def select(self, inputs: dict[str, Any], logprob: torch.Tensor | None, renyi2: torch.Tensor | None,
               entropies: torch.Tensor, mask: torch.Tensor, sink: dict[str, list[float]], step: int
               ) -> tuple[torch.Tensor, Any]:
        """The selector's (B, T) weights for this micro-batch and its `Selection`. `inputs`: TRL's micro-batch (with
        group_js already scored where it is needed); `logprob`, `renyi2`: (B, T) from the loss pass, None when it was
        not captured; `step`: the step it counts for. The selector's metrics and the selection diagnostics go into
        `sink` (the step's select_metrics) with one device-to-host copy."""
        check_inputs(self.selector, self.config.select, inputs, logprob, self.faults.faults)
        tr = self.trainer
        acc = tr.accelerator
        inp = selection_input(
            inputs, logprob, entropies, mask, step=tr.state.global_step, generator=self.generator,
            epsilon_low=tr.epsilon_low, epsilon_high=tr.epsilon_high, loss_type=tr.loss_type,
            gather=None if self.world == 1 else (lambda x: _gather_1d(acc, x)),
            reference_js=reference_js(self.selector, inputs))
        chosen = self.selector(inp)
        weights = chosen.weights.detach()
        totals = selection_totals(weights, inp.mask, inp.advantages)
        self._totals[step] = totals + self._totals[step] if step in self._totals else totals
        with self.faults.guard("select_metrics"):
            record_metrics(sink, chosen.metrics, weights, inp, renyi2)
        return weights, chosen

    def loss(self, chosen: Any, inputs: dict[str, Any]) -> torch.Tensor | None:
        """The selector's loss_delta for the micro-batch, aggregated like TRL (None when it has none). Runs before
        and apart from recording: a recording fault never drops a term of the objective."""
        if chosen is None or chosen.loss_delta is None:
            return None
        from forkwatch.plugin.selection.policy_loss import aggregate_like_trl

        return aggregate_like_trl(chosen.loss_delta, response_mask(inputs), self.trainer, inputs)

    def take_step(self, step: int) -> tuple[float, float, float] | None:
        """`selection_totals` of this rank's micro-batches of `step` as floats (steps before it are forgotten); None
        when the selector did not run at that step. One host copy per step."""
        found = self._totals.pop(step, None)
        for old in [s for s in self._totals if s < step]:
            del self._totals[old]
        return None if found is None else tuple(found.tolist())

    # ------------------------------------------------------------------ checkpoints
    def _rng_path(self, checkpoint: str) -> str:
        return os.path.join(checkpoint, f"forkwatch_select_rng_{self.rank}.pt")

    def save_rng(self, checkpoint: str) -> None:
        """Write this rank's selector generator state into `checkpoint` (a resume then draws the same tokens)."""
        torch.save(self.generator.get_state(), self._rng_path(checkpoint))

    def load_rng(self, checkpoint: str) -> None:
        """Restore the selector generator saved in `checkpoint`; without one, say that selections will differ."""
        path = self._rng_path(checkpoint)
        if not os.path.isfile(path):
            if self.selector is not None:
                logger.warning("forkwatch: %s has no selector generator state (%s); the resumed run's random "
                               "selections will differ from an uninterrupted run's", checkpoint, os.path.basename(path))
            return
        self.generator.set_state(torch.load(path, weights_only=True))


# ------------------------------------------------------------------------------------------------ pure functions
def check_inputs(selector: Any, name: str, inputs: dict[str, Any], logprob: torch.Tensor | None,
                 faults: dict[str, int]) -> None:
    """Stop training (RuntimeError naming the cause and the fix) when the selection cannot be computed for this
    micro-batch: the loss pass was not captured, or the selector's score is missing. Training densely instead would
    silently give the user plain GRPO."""
    if logprob is None:
        raise RuntimeError(
            f"forkwatch: select={name!r} cannot compute its selection for this micro-batch: the loss pass was not "
            f"captured (faults so far: {faults}; the first of each is logged above). Training stops rather than "
            "train this step without the selection; fix the logged error, or set select=None.")
    if selector.needs_group_js and inputs.get(GROUP_JS) is None:
        cause = (f"the generation hook failed (faults: {faults}; logged above)" if faults
                 else "it was not computed for this generation batch")
        raise RuntimeError(
            f"forkwatch: select={name!r} scores tokens by group_js, which is missing for this micro-batch: {cause}. "
            "Training stops rather than train this step densely; fix the logged error, or choose a selector that "
            "does not need group_js (e.g. select='high_entropy').")


def reference_js(selector: Any, inputs: dict[str, Any]) -> torch.Tensor | None:
    """The micro-batch's reference JS for a selector that asked for it (None otherwise); a missing one stops
    training with the cause, rather than train the step without the selection."""
    if not getattr(selector, "needs_reference_js", False):  # duck-typed selectors: no
        return None
    score = inputs.get(REFERENCE_JS)
    if score is None:
        raise RuntimeError(
            f"forkwatch: select={selector.name!r} with against='reference' scores tokens by the reference JS, which "
            "is missing for this micro-batch (its generation batch was not scored; the error is logged above). "
            "Training stops rather than train this step densely; fix the logged error, or use against='siblings'.")
    return score


def selection_input(inputs: dict[str, Any], logprob: torch.Tensor, entropies: torch.Tensor, mask: torch.Tensor, *,
                    step: int, generator: torch.Generator, epsilon_low: float, epsilon_high: float, loss_type: str,
                    gather: Any = None, reference_js: torch.Tensor | None = None) -> Any:
    """The selector's `SelectionInput` from TRL's micro-batch dict `inputs` (ids, advantages, forkwatch's keys) and
    the loss pass's (B, T) `logprob` (with gradient) and `entropies`; TRL skips the old-logprob pass on-policy, and
    then the old log-probs are the current ones, detached (as in TRL's loss)."""
    from forkwatch.plugin.selection.registry import SelectionInput

    old = inputs.get("old_per_token_logps")
    return SelectionInput(
        mask=mask.float(), entropy=entropies.detach(), logprob=logprob,
        old_logprob=logprob.detach() if old is None else old, advantages=inputs["advantages"],
        group_ids=inputs[GROUP_ID], group_js=inputs.get(GROUP_JS), step=step, generator=generator,
        epsilon_low=epsilon_low, epsilon_high=epsilon_high, loss_type=loss_type, gather=gather,
        # what some selectors read besides the scores: ict against the reference, the demo's oracle
        reference_js=reference_js, prompt_ids=inputs.get("prompt_ids"), completion_ids=inputs.get("completion_ids"),
    )


@no_grad
def selection_totals(weights: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """(3,) float64 on the device: response tokens the selection kept (weight != 0), the gradient they carry
    Σ_kept |w|·|A|, and what every response token would carry densely, Σ |A|. A selection trains on nothing when it
    keeps no token, or when its kept tokens carry no gradient while the dense step would (the callback counts it)."""
    valid = mask > 0
    adv = (advantages.unsqueeze(1) if advantages.dim() == 1 else advantages).double().abs().expand_as(weights)
    kept = (weights != 0) & valid
    return torch.stack([kept.sum().double(), torch.where(kept, weights.double().abs() * adv, 0.0).sum(),
                        torch.where(valid, adv, 0.0).sum()])


@no_grad
def record_metrics(sink: dict[str, list[float]], metrics: dict[str, Any], weights: torch.Tensor, inp: Any,
                    renyi2: torch.Tensor) -> None:
    """The selector's metrics and the `DIAGNOSTICS` of this micro-batch into `sink` (the step's select_metrics)."""
    diag = token_math.selection_diagnostics(weights, inp.mask, inp.logprob.detach(), inp.entropy, renyi2.detach(),
                                            inp.advantages)  # (4,)
    values = {k: v for k, v in metrics.items() if not isinstance(v, torch.Tensor)}
    lazy = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
    stacked = torch.cat([*(metrics[k].detach().reshape(1).to(diag) for k in lazy), diag])
    values.update(zip([*lazy, *token_math.DIAGNOSTICS], stacked.tolist(), strict=True))  # the one host copy
    for k, v in values.items():
        sink.setdefault(k, []).append(float(v))


def _gather_1d(accelerator, x: torch.Tensor) -> torch.Tensor:
    """Concatenate a 1-D tensor of any length over ranks (NaN pads, then dropped)."""
    padded = accelerator.pad_across_processes(x.float(), dim=0, pad_index=float("nan"))
    out = accelerator.gather(padded)
    return out[~torch.isnan(out)]
