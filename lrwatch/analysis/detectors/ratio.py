"""Update-ratio detector: ||delta theta|| / ||theta|| sustained far from about 1e-3.

A healthy step changes a weight matrix by roughly a thousandth of its norm. Much more and the
run is unstable (the LR is too high); much less and it barely learns (the LR is too low). The
rule looks at the median over a full window, so a single large step, or the large first steps
of a run, do not count: "sustained" means a whole window of them.

A high ratio is a warning only when the loss over the same steps is not clearly falling. Early
in training, and at the peak of a warm-up, ratios of 1-2e-2 are common on small networks while
the loss falls steadily: an aggressive LR that works is reported as info, not as instability.

The ratio is meaningful on weight matrices. Norm gains, biases and embeddings legitimately move
at other rates, so :func:`weight_matrix_tags` picks the per-tensor tags worth judging and
:func:`aggregate` folds them into one series (median over tensors at each step). Check that
series and the global ``lrwatch/update_ratio`` separately.

Example:
    >>> import numpy as np
    >>> f = RatioDetector().check(np.arange(60), np.full(60, 0.05), tag="lrwatch/update_ratio")
    >>> f.kind.value, f.severity.value
    ('ratio_high', 'warning')
    >>> falling = (np.arange(60), 2.0 - 0.01 * np.arange(60))
    >>> RatioDetector().check(np.arange(60), np.full(60, 0.05), tag="r", loss=falling).severity
    <Severity.INFO: 'info'>
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from lrwatch import schema
from lrwatch.analysis.detectors._window import (
    Steps,
    Values,
    Window,
    as_window,
    finite_tail,
    fmt,
    kendall,
    quiet_numpy,
)
from lrwatch.errors import ConfigError
from lrwatch.schema import Finding

AGGREGATE_TAG = schema.PER_TENSOR_PREFIXES["update_ratio"] + "/*"
"""Tag under which findings on the aggregated weight-matrix series are reported."""

# Parameter names whose tensors are not weight matrices even when they end in "weight":
# LayerNorm/BatchNorm/RMSNorm gains ("ln_1.weight", "bn1.weight", "norm.weight") and embedding
# tables ("wte.weight", "embed_tokens.weight"), which only move the rows a batch touches.
_NOT_MATRIX = re.compile(
    r"(^|[._])(ln|bn|gn|norm|layernorm|rmsnorm|layer_norm|emb|embed|embedding|"
    r"embeddings|embed_tokens|wte|wpe|pos_emb|position_embeddings)\w*[.]",
    re.I,
)


def weight_matrix_tags(tags: Iterable[str]) -> list[str]:
    """The per-tensor update-ratio tags of weight matrices, sorted.

    Keeps ``lrwatch.update_ratio/<name>`` whose name ends in ``weight``, except norms and
    embeddings (see ``_NOT_MATRIX``); biases end in ``bias`` and are dropped by the suffix rule.
    """
    prefix = schema.PER_TENSOR_PREFIXES["update_ratio"] + "/"
    out = []
    for tag in tags:
        name = tag[len(prefix) :] if tag.startswith(prefix) else None
        if name and name.endswith("weight") and not _NOT_MATRIX.search("." + name):
            out.append(tag)
    return sorted(out)


def aggregate(series: Mapping[str, Window]) -> Window:
    """Median over tensors at each step where any of them was logged (NaNs ignored)."""
    parts = [as_window(*w) for w in series.values()]
    parts = [(s[np.isfinite(v)], v[np.isfinite(v)]) for s, v in parts]
    if not parts or all(s.size == 0 for s, _ in parts):
        return np.zeros(0, np.int64), np.zeros(0, np.float64)
    steps = np.concatenate([s for s, _ in parts])
    values = np.concatenate([v for _, v in parts])
    order = np.argsort(steps, kind="stable")
    steps, values = steps[order], values[order]
    uniq, start = np.unique(steps, return_index=True)
    meds = np.array([np.median(g) for g in np.split(values, start[1:])], dtype=np.float64)
    return uniq.astype(np.int64), meds


_EPS = 1e-9  # the batch twin leaves medians this close to a threshold to check


@dataclass(frozen=True)
class RatioDetector:
    """Flag a median update/weight ratio above ``high`` or below ``low`` over the window.

    ``ratio_high`` is a warning (critical at ``critical_factor * high``); ``ratio_low`` is info:
    the policy only advises raising the LR.

    Args:
        high: median above this is ``ratio_high``. 3e-2: thirty times the healthy 1e-3. Small
            networks at their tuned LR sit at 1-2e-2 (the zoo's MLPs, CNN and GRU, bench/zoo),
            so 1e-2 raised warnings on good runs; 3% of the weights per step does not settle.
        low: median below this is ``ratio_low``. 3e-4: a third of healthy; in the zoo's LR
            sweeps (bench/zoo) runs at 0.03x their tuned LR sat at 1e-4 to 5e-4 while tuned
            ones sat at 1e-3 to 1e-2; a decayed schedule's tail gets there legitimately, so the
            policy only advises, and not deep in a decaying tail.
        window: points in the median. 50: long enough to be "sustained", short enough to see
            the effect of an LR change within a few logging intervals.
        min_points: fewer finite points give no verdict. 50 (the whole window): a median over
            the first few logged steps is the start-up transient (ratios of 1e-2 and more
            that fall within tens of steps), not a sustained condition.
        critical_factor: ``ratio_high`` becomes critical at ``critical_factor * high``. 3.0:
            a median of 9% of the weights per step is an unstable run.
        progress_alpha: a loss falling over the window's steps with a one-sided Kendall p below
            this turns a ``ratio_high`` warning into info. 0.01: only a clear fall counts; a
            flat or bouncing loss keeps the warning. A critical ratio stays critical.
        early_points: with at least this many points but fewer than ``min_points``, a median
            at the critical level (``critical_factor * high``) is critical already, unless the
            loss over those steps is clearly falling. 10: in the zoo's quick sweep, medians
            over the first 10-49 steps at the tuned LR peaked at 0.035 (6 tasks, 2 seeds);
            runs at 10x-100x reached 0.09-89 (the critical level is 0.09), and waiting for 50
            points let the ones that blew up grow their loss 100x before the first cut.
    """

    high: float = 3e-2
    low: float = 3e-4
    window: int = 50
    min_points: int = 50
    critical_factor: float = 3.0
    progress_alpha: float = 0.01
    early_points: int = 10

    def __post_init__(self) -> None:
        if not 0 < self.low < self.high:
            raise ConfigError(
                f"ratio needs 0 < low < high, got low={self.low} high={self.high}; "
                "the healthy update ratio is about 1e-3, e.g. low=3e-4 high=3e-2"
            )
        if not 0 < self.progress_alpha < 1:
            raise ConfigError(f"ratio needs 0 < progress_alpha < 1, got {self.progress_alpha}")
        bad_early = self.early_points < 1
        if not 1 <= self.min_points <= self.window or self.critical_factor < 1 or bad_early:
            raise ConfigError(
                f"ratio needs 1 <= min_points <= window, early_points >= 1 and critical_factor"
                f" >= 1, got {self.min_points}, {self.window}, {self.early_points}, "
                f"{self.critical_factor}"
            )

    @quiet_numpy
    def check(
        self, steps: Steps, values: Values, *, tag: str, loss: Window | None = None
    ) -> Finding | None:
        """ratio_high / ratio_low finding from the window's median, else None.

        ``loss`` is the training-loss series; only its points within the ratio window's steps
        are used, to tell an aggressive-but-working LR (info) from an unstable one (warning).
        """
        s, v = as_window(steps, values)
        if v.size == 0 or not math.isfinite(float(v[-1])):
            return None
        s, v = finite_tail(s, v, self.window)
        if v.size < self.min_points:
            return self._early(s, v, tag=tag, loss=loss)
        med = float(np.median(v))
        if self.low <= med <= self.high:
            return None
        high = med > self.high
        kind = schema.Kind.RATIO_HIGH if high else schema.Kind.RATIO_LOW
        # Too slow is advice, never an alarm: a schedule's decayed tail gets there legitimately.
        severity = schema.Severity.WARNING if high else schema.Severity.INFO
        if high and med >= self.critical_factor * self.high:
            severity = schema.Severity.CRITICAL
        frac = float(np.mean(v > self.high)) if high else float(np.mean(v < self.low))
        progress = None
        if severity is schema.Severity.WARNING:  # the only verdict a falling loss changes
            progress = self._loss_progress(loss, first=int(s[0]), last=int(s[-1]))
            severity = schema.Severity.INFO if progress is not None else severity
        evidence = {
            "median": med,
            "threshold": self.high if high else self.low,
            "fraction_beyond": frac,
            "min": float(v.min()),
            "max": float(v.max()),
            "window": int(v.size),
            "first_step": int(s[0]),
            "loss_falling": progress is not None,
            "loss_tau": None if progress is None else progress[0],
            "loss_p_value": None if progress is None else progress[1],
        }
        word = "above" if high else "below"
        message = (
            f"{tag}: median update/weight ratio {fmt(med)} over {v.size} points (steps "
            f"{int(s[0])}-{int(s[-1])}) is {word} {fmt(self.high if high else self.low)} "
            f"({fmt(100 * frac)}% of points); healthy is about 1e-3"
        )
        if progress is not None and high:
            message += f", but the loss keeps falling (Kendall p {fmt(progress[1])})"
        return Finding(kind, int(s[-1]), tag, severity, evidence, message)

    @quiet_numpy
    def quiet_many(self, values: Values, *, from_start: bool) -> NDArray[np.bool_]:
        """Batch twin of :meth:`check` and :meth:`early` over a run of finite points.

        For each point of ``values`` (finite, oldest first), True when ``check`` gives None
        there and ``early`` is False, for the window ending there: a median within [low, high]
        (below the critical level while the window is short of ``min_points``). A median
        within a hair of a threshold is False: ``check`` decides. ``from_start``: ``values``
        begins the series, so its first windows are short; otherwise they are not judged.
        """
        out = np.zeros(values.size, dtype=bool)
        for i in range(min(values.size, self.window - 1) if from_start else 0):
            out[i] = self._quiet_short(values[: i + 1])
        if values.size >= self.window:
            windows = np.lib.stride_tricks.sliding_window_view(values, self.window)
            med = np.median(windows, axis=1)
            out[self.window - 1 :] = (med >= self.low * (1 + _EPS)) & (
                med <= self.high * (1 - _EPS)
            )
        return out

    def _quiet_short(self, v: Values) -> bool:
        med = float(np.median(v))
        if v.size < self.min_points:  # only early's critical median could speak
            return v.size < self.early_points or med < self.critical_factor * self.high * (1 - _EPS)
        return self.low * (1 + _EPS) <= med <= self.high * (1 - _EPS)

    def early(self, steps: Steps, values: Values) -> bool:
        """Whether a window too short for a full verdict has a critical median (then the loss
        decides: call :meth:`check` with it)."""
        s, v = finite_tail(*as_window(steps, values), self.window)
        crit = self.critical_factor * self.high
        return self.early_points <= v.size < self.min_points and float(np.median(v)) >= crit

    def _early(self, s: Steps, v: Values, *, tag: str, loss: Window | None) -> Finding | None:
        """Critical ``ratio_high`` from a short window: a critical median, the loss not
        clearly falling over the same steps."""
        if not self.early(s, v) or loss is None:
            return None
        if self._loss_progress(loss, first=int(s[0]), last=int(s[-1])) is not None:
            return None
        med = float(np.median(v))
        evidence = {
            "median": med,
            "threshold": self.critical_factor * self.high,
            "fraction_beyond": float(np.mean(v > self.high)),
            "min": float(v.min()),
            "max": float(v.max()),
            "window": int(v.size),
            "first_step": int(s[0]),
            "loss_falling": False,
            "early": True,
            # the loss never fell since this window began: the weights worth going back to
            "last_good": int(s[0]),
        }
        message = (
            f"{tag}: median update/weight ratio {fmt(med)} over the first {v.size} points "
            f"(steps {int(s[0])}-{int(s[-1])}) is {fmt(med / 1e-3)}x the healthy 1e-3 and the "
            "loss is not falling"
        )
        return Finding(
            schema.Kind.RATIO_HIGH, int(s[-1]), tag, schema.Severity.CRITICAL, evidence, message
        )

    def _loss_progress(
        self, loss: Window | None, *, first: int, last: int
    ) -> tuple[float, float] | None:
        """(tau, p) of a clearly falling loss over steps ``first..last``, else None."""
        if loss is None:
            return None
        ls, lv = as_window(*loss)
        inside = (ls >= first) & (ls <= last) & np.isfinite(lv)
        trend = kendall(ls[inside].astype(np.float64), lv[inside], alternative="less")
        return trend if trend is not None and trend[1] < self.progress_alpha else None
