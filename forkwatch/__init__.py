"""forkwatch: token-level entropy, divergence and fork monitoring (and token selection) for TRL GRPO runs.

    from forkwatch import attach
    attach(trainer, log_dir="runs", select="ict")   # select=None only watches

The public names are imported lazily so that `forkwatch.store` and `forkwatch.dashboard` never pull in torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> module that defines it
_PUBLIC = {
    "attach": "forkwatch.plugin.attach",
    "ForkwatchCallback": "forkwatch.plugin.callback",
    "ForkwatchConfig": "forkwatch.plugin.config",
    # your own selector: @register_selector("name") on fn(inp: SelectionInput, *, option=default) -> Selection
    "register_selector": "forkwatch.plugin.selection.registry",
    "SelectionInput": "forkwatch.plugin.selection.registry",
    "Selection": "forkwatch.plugin.selection.registry",
}
__all__ = ["__version__", "attach", "ForkwatchCallback", "ForkwatchConfig", "register_selector", "SelectionInput",
           "Selection"]

if TYPE_CHECKING:  # pragma: no cover
    from forkwatch.plugin.attach import attach
    from forkwatch.plugin.callback import ForkwatchCallback
    from forkwatch.plugin.config import ForkwatchConfig
    from forkwatch.plugin.selection.registry import Selection, SelectionInput, register_selector


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'forkwatch' has no attribute {name!r}")
