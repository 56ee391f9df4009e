"""forkwatch's own CPU time on the training thread, by entry point: `time.thread_time` around each method that TRL,
a forward hook or the Trainer's callback loop calls, so load from other processes does not inflate it. The one list
of entry points for the benchmarks that report time per hook (`realistic.py`, `real_model.py`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import time
from collections.abc import Iterator

ENTRY_POINTS = (  # (module, class, methods)
    ("forkwatch.plugin.gen_evidence", "GenScorer", ("on_forward",)),  # each decode step (its `take` runs in on_generation)
    ("forkwatch.plugin.capture", "Capture",
     ("on_generation", "begin_micro_batch", "on_loss_values", "on_backbone_forward", "end_micro_batch")),
    ("forkwatch.plugin.callback", "ForkwatchCallback", ("on_train_begin", "on_step_end", "on_train_end")),
)


@contextlib.contextmanager
def hook_times() -> Iterator[dict[str, float]]:
    """Inside the block every entry point is timed; yields {method: thread CPU seconds so far}. The classes' own
    methods are put back afterwards. A method that moved fails here, naming itself, rather than timing nothing."""
    spent: dict[str, float] = {}
    originals = []
    for module, cls_name, names in ENTRY_POINTS:
        cls = getattr(importlib.import_module(module), cls_name)
        for name in names:
            fn = cls.__dict__.get(name)
            if fn is None:
                raise AttributeError(f"{cls_name}.{name} is gone from {module}: update benchmarks/hook_timer.py")
            originals.append((cls, name, fn))
            setattr(cls, name, _timed(fn, name, spent))
    try:
        yield spent
    finally:
        for cls, name, fn in originals:
            setattr(cls, name, fn)


def _timed(fn, name: str, spent: dict[str, float]):
    @functools.wraps(fn)
    def wrapper(*a, **k):
        t0 = time.thread_time()
        try:
            return fn(*a, **k)
        finally:
            spent[name] = spent.get(name, 0.0) + time.thread_time() - t0

    return wrapper
