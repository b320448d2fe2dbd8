"""The max_norm of a new gradient clip, taken from the run's own recent grad norms.

The one numeric estimate the policy makes (AutoClip-style: a percentile of the finite norms),
with its own fallback when the history is too short to trust.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


def clip_threshold(
    grad_norms: ArrayLike | None, *, percentile: float, min_norms: int, fallback: float
) -> tuple[float, str]:
    """``(max_norm, where it comes from)`` for a clip, from values or a ``(steps, values)`` pair.

    Fewer than ``min_norms`` finite, positive norms give ``fallback``.
    """
    if isinstance(grad_norms, tuple) and len(grad_norms) == 2:
        grad_norms = grad_norms[1]  # the analyzer's (steps, values) window
    x = np.asarray([] if grad_norms is None else grad_norms, dtype=np.float64).reshape(-1)
    x = x[np.isfinite(x) & (x > 0)]
    if x.size < min_norms:
        return fallback, f"only {x.size} usable grad norm(s), so the common default {fallback:g}"
    return float(np.percentile(x, percentile)), (
        f"the {percentile:g}th percentile of the last {x.size} finite grad norms "
        "(AutoClip-style: it clips the spikes, not ordinary steps)"
    )
