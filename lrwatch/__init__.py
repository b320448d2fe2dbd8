"""lrwatch: a training-run monitor and learning-rate advisor for PyTorch.

One line in a training loop records what the advisor needs::

    mon = lrwatch.watch(model, optimizer, logdir="runs/exp1")

Importing lrwatch stays light: the public names load on first use (PEP 562), so the daemon and
the CLI (``lrwatch --help``, ``lrwatch serve``) never pay for importing torch, and scipy,
watchdog and click load only with the daemon and the CLI.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lrwatch.hook.monitor import Monitor, StopTraining, watch
    from lrwatch.lr_finder.finder import LRFinderResult, find_lr

__version__ = "0.1.0"

__all__ = ["LRFinderResult", "Monitor", "StopTraining", "__version__", "find_lr", "watch"]

_LAZY = {
    "LRFinderResult": "lrwatch.lr_finder.finder",
    "find_lr": "lrwatch.lr_finder.finder",
    "Monitor": "lrwatch.hook.monitor",
    "StopTraining": "lrwatch.hook.monitor",
    "watch": "lrwatch.hook.monitor",
}


_SUBMODULES = ("lightning", "hf")  # integrations: lrwatch.lightning.LRWatch() after import lrwatch


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"lrwatch.{name}")
    try:
        module = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'lrwatch' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
