"""When advice to raise the LR would be wrong, whatever the loss's shape says.

``slow_progress`` (a training loss still falling in a straight line) and ``ratio_low`` (tiny
updates) ask for a higher LR. Two facts overrule them, both read from the run itself:

- the validation loss has gone the plateau's ``patience`` checks without a new best: a training
  loss still falling fast is then a run fitting its training set (``reg_diabetes`` at 10x was
  advised to raise its LR two checks before it was stopped for overfitting);
- the update/weight ratio's recent median is above the ratio rule's ``high`` threshold: the
  updates are already far above ~1e-3 of the weights, so a slow fall is not a timid LR (a ViT at
  10x its tuned LR, loss falling slowly between gradient spikes, was advised to raise it).
"""

from __future__ import annotations

import numpy as np

from lrwatch.analysis.detectors.ratio import RatioDetector
from lrwatch.analysis.history import History
from lrwatch.analysis.run_tags import RunTags
from lrwatch.schema import Kind

RAISE_LR_KINDS = (Kind.SLOW_PROGRESS, Kind.RATIO_LOW)  # the findings answered by raise-LR advice


def raise_lr_overruled(
    history: History, tags: RunTags, *, metric: str | None, patience: int, ratio: RatioDetector
) -> str | None:
    """Why raise-LR advice would be wrong now, or None when nothing overrules it."""
    if validation_stalled(history, tags, metric=metric, patience=patience):
        return f"{metric} has gone {patience} checks without a new best"
    window = tags.window(history, "update_ratio", ratio.window)
    if window is not None:
        values = window[1][np.isfinite(window[1])]
        if values.size and float(np.median(values)) > ratio.high:
            return f"the update ratio's median is above {ratio.high:g}"
    return None


def validation_stalled(
    history: History, tags: RunTags, *, metric: str | None, patience: int
) -> bool:
    """Whether the monitored validation loss (not the training loss standing in for it) has
    had ``patience`` points since its best."""
    if metric is None or metric == tags.roles.get("loss"):
        return False
    best = history.best(metric, "min")
    steps, _ = history.window(metric, patience + 1)
    return best is not None and int((steps > best[0]).sum()) >= patience
