"""lrwatch: a training-run monitor and learning-rate advisor for PyTorch.

One line in a training loop records what the advisor needs::

    mon = lrwatch.watch(model, optimizer, logdir="runs/exp1")

Importing lrwatch stays light: scipy, watchdog and click load only with the daemon and the CLI.
"""

from __future__ import annotations

from lrwatch.monitor import Monitor, watch

__version__ = "0.1.0"

__all__ = ["Monitor", "__version__", "watch"]
