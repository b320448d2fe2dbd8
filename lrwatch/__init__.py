"""lrwatch: a training-run monitor and learning-rate advisor for PyTorch.

One line in a training loop records what the advisor needs::

    mon = lrwatch.watch(model, optimizer, logdir="runs/exp1")

Importing lrwatch stays light: scipy, watchdog and click load only with the daemon and the CLI.
"""

from __future__ import annotations

from lrwatch.lr_finder import LRFinderResult, find_lr
from lrwatch.monitor import Monitor, StopTraining, watch

__version__ = "0.1.0"

__all__ = ["LRFinderResult", "Monitor", "StopTraining", "__version__", "find_lr", "watch"]
