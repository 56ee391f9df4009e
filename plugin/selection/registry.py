"""The selector registry: one signature for every token-selection method, one snake_case name each.

A selector sees one micro-batch of the loss pass (`SelectionInput`) and returns per-token gradient weights plus
metrics (`Selection`). Methods that change the per-token loss itself (KL-Cov, GPPO) also return `loss_delta`, which
the glue adds to TRL's per-token policy loss before TRL's own normalisation. Register your own with
`@forkwatch.register_selector("name")`; it is then usable as `attach(trainer, select="name")`. The built-in methods
are in plugin/selection/methods.py.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class SelectionInput:
    """One micro-batch of the loss pass. B completions, T completion positions."""

    mask: torch.Tensor  # (B, T) float, 1.0 on response tokens that count in the loss
    entropy: torch.Tensor  # (B, T) nats, detached
    logprob: torch.Tensor  # (B, T) log p(y_t), current policy, WITH gradient: detach it for scores
    old_logprob: torch.Tensor  # (B, T) detached; equals logprob.detach() when TRL skips the old-logprob pass
    advantages: torch.Tensor  # (B,)
    group_ids: torch.Tensor  # (B,) long, the prompt group of each completion
    group_js: torch.Tensor | None  # (B, T) ICT's score, present when the selector asked for it
    step: int  # optimizer step (trainer.state.global_step) the micro-batch belongs to
    generator: torch.Generator  # forkwatch's own seeded generator: never touch the global RNG
    epsilon_low: float  # TRL's clip range, for methods that look at clipping
    epsilon_high: float
    loss_type: str  # TRL's loss_type
    # Concatenates a 1-D tensor of any length over all ranks (e.g. accelerate's pad_across_processes + gather);
    # None = single process. Selectors whose cut-off is a batch quantile use it so the quantile is global.
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None
    # (B, T) JS(π_θ(·|s) ‖ π_ref(·|s)) in each token's context, present when the selector asked for it
    # (`needs_reference_js`; plugin/selection/reference.py)
    reference_js: torch.Tensor | None = None
    # TRL's token ids of the micro-batch, for selectors that read a task's ground truth (the demo's oracle)
    prompt_ids: torch.Tensor | None = None  # (B, P), left-padded
    completion_ids: torch.Tensor | None = None  # (B, T)


@dataclass
class Selection:
    weights: torch.Tensor  # (B, T) float, detached; multiplies the per-token policy loss, 0 drops the token
    loss_delta: torch.Tensor | None = None  # (B, T), with gradient: added to the per-token policy loss
    # e.g. {"threshold": 0.67, "warmup": 0.0}; values may be 0-d tensors: the glue copies every metric of a micro-batch
    # to the host in one transfer, so a selector need not synchronise the device for each (float() would).
    metrics: dict[str, float | torch.Tensor] = field(default_factory=dict)


SelectorFn = Callable[..., Selection]


# A need that may depend on the options (ICT's score is group-JS or the reference JS by `against`): a bool, or a
# function of the resolved options (defaults filled in) returning one.
Need = bool | Callable[[dict[str, Any]], bool]


@dataclass(frozen=True)
class SelectorSpec:
    name: str
    fn: SelectorFn
    needs_group_js: Need = False
    needs_reference_js: Need = False
    changes_loss: bool = False  # returns loss_delta (refused with loss types it was not defined for)
    # acts only through the importance ratio: exactly GRPO when TRL never reuses a rollout (attach warns then)
    needs_off_policy: bool = False
    # Called by get_selector with every option resolved (defaults filled in); raises ValueError naming the fix.
    check_options: Callable[..., None] | None = None
    # Called at attach with the resolved options and the trainer's GRPOConfig: refuses (ValueError naming the fix) or
    # warns about a run this method cannot train as the user expects (policy_loss.validate_selection).
    check_run: Callable[[dict[str, Any], Any], None] | None = None


_REGISTRY: dict[str, SelectorSpec] = {}


def register_selector(
    name: str,
    *,
    needs_group_js: Need = False,
    needs_reference_js: Need = False,
    changes_loss: bool = False,
    needs_off_policy: bool = False,
    check_options: Callable[..., None] | None = None,
    check_run: Callable[[dict[str, Any], Any], None] | None = None,
):
    """Decorator: `fn(inp: SelectionInput, *, option=default, ...) -> Selection` becomes selectable as `name`.

    `check_options(**options)` (optional) receives every keyword-only option of `fn`, defaults filled in, when the
    selector is bound, so that a bad value is refused at attach time rather than in the middle of training.
    `check_run(options, trainer_args)` (optional) sees them with the trainer's GRPOConfig at attach.
    """

    def deco(fn: SelectorFn) -> SelectorFn:
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            raise ValueError(f"a selector named {name!r} is already registered")
        _REGISTRY[name] = SelectorSpec(
            name, fn, needs_group_js=needs_group_js, needs_reference_js=needs_reference_js, changes_loss=changes_loss,
            needs_off_policy=needs_off_policy, check_options=check_options, check_run=check_run,
        )
        return fn

    return deco


def unregister_selector(name: str) -> None:
    """Remove `name` from the registry (a KeyError naming the registered selectors if it is not there)."""
    if name not in _REGISTRY:
        raise KeyError(f"no selector named {name!r} is registered; registered: {', '.join(sorted(_REGISTRY))}")
    del _REGISTRY[name]


@contextmanager
def registered_selector(name: str, fn: SelectorFn, **spec_options: Any) -> Iterator[SelectorFn]:
    """`register_selector(name, **spec_options)(fn)` for the duration of a `with` block, removed on exit.

    For tests and experiments that must not leave a selector behind in the process-wide registry.
    """
    register_selector(name, **spec_options)(fn)
    try:
        yield fn
    finally:
        unregister_selector(name)


def _load_builtins() -> None:
    from forkwatch.plugin.selection import methods  # noqa: F401  (registers the built-in methods)


def selector_names() -> list[str]:
    """Every registered name, the built-in methods included (sorted)."""
    _load_builtins()
    return sorted(_REGISTRY)


@dataclass(frozen=True)
class BoundSelector:
    """A selector with its options fixed (validated once, at attach time)."""

    spec: SelectorSpec
    options: dict[str, Any]

    @property
    def name(self) -> str:
        return self.spec.name

    def resolved_options(self) -> dict[str, Any]:
        """Every keyword-only option of the method: its defaults, overridden by the options given."""
        params = inspect.signature(self.spec.fn).parameters
        resolved = {p: v.default for p, v in params.items()
                    if v.kind is inspect.Parameter.KEYWORD_ONLY and v.default is not inspect.Parameter.empty}
        return {**resolved, **self.options}

    def _need(self, need: Need) -> bool:
        return bool(need(self.resolved_options())) if callable(need) else bool(need)

    @property
    def needs_group_js(self) -> bool:
        return self._need(self.spec.needs_group_js)

    @property
    def needs_reference_js(self) -> bool:
        return self._need(self.spec.needs_reference_js)

    @property
    def changes_loss(self) -> bool:
        return self.spec.changes_loss

    @property
    def needs_off_policy(self) -> bool:
        return self.spec.needs_off_policy

    def __call__(self, inp: SelectionInput) -> Selection:
        return self.spec.fn(inp, **self.options)


def get_selector(name: str, **options: Any) -> BoundSelector:
    """Look a selector up by name and bind its options; unknown names or options raise a ValueError naming the fix."""
    if name not in _REGISTRY:
        _load_builtins()
    if name not in _REGISTRY:
        raise ValueError(f"unknown selector {name!r}; valid names: {', '.join(selector_names())}")
    spec = _REGISTRY[name]
    params = inspect.signature(spec.fn).parameters
    accepted = {p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY}
    unknown = set(options) - accepted
    if unknown:
        raise ValueError(
            f"selector {name!r} does not take {sorted(unknown)}; its options are {sorted(accepted) or 'none'}"
        )
    if spec.check_options is not None:
        resolved = {p: params[p].default for p in accepted if params[p].default is not inspect.Parameter.empty}
        spec.check_options(**{**resolved, **options})
    return BoundSelector(spec, dict(options))
