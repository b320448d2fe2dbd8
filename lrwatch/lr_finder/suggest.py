"""Rules that read a learning rate off an LR range-test curve (pure, stdlib only).

Each rule takes the swept LRs and the smoothed losses and returns a :class:`Suggestion`: an LR,
or ``None`` with the reason the curve does not support one (too short, flat, all non-finite).
The curve's LRs are geometric, so "per log LR" and "per step" differ by a constant factor and
every slope here is taken against ``log(lr)``.

Rules (the ones people use, each under its usual name):

* ``min_div_10`` (lrwatch's default): the LR at the minimum of the smoothed loss, divided by 10
  (fastai's older ``lr_min``). A minimum is a level, not a slope: noise moves it by a few steps,
  and the factor 10 leaves room for the smoothing lag and the jitter. Across seeds and three real
  setups it gave the lowest loss after training and never a wild pick
  (bench/lr_finder_compare.py; README "LR range test").
* ``valley``: the middle of the longest descending stretch after the plateau (fastai's
  ``valley``, which takes its middle too). Close to the default with Adam; with SGD momentum it
  sits later on the descent, nearer the blow-up.
* ``steepest``: the most negative slope of the smoothed loss (torch-lr-finder's
  ``plot(suggest_lr=True)``, which trims 10 points at the start and 5 at the end). A slope is a
  difference of two noisy numbers, so this rule jumps between spikes from run to run.
* ``blowup_fraction``: a fraction (1/10) of the LR at which the loss blew up. Stable, but only as
  good as the divergence threshold, and none when the sweep never diverged.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_RULE = "min_div_10"  # best outcome, least moved by noise: bench/lr_finder_compare.py
RULES = ("valley", "steepest", "min_div_10", "blowup_fraction")
MIN_POINTS = 5  # fewer finite points than this is not a curve
FLAT_REL = 1e-3  # a curve whose range is below this fraction of its level is flat
STEEPEST_SKIP = (10, 5)  # torch-lr-finder's plot() defaults: points trimmed at start and end
PLATEAU_EXIT = 0.05  # the plateau's level: within 5% of the total drop from its median
BLOWUP_FRACTION = 0.1  # one decade below the LR where the loss blew up


@dataclass(frozen=True)
class Suggestion:
    """One rule's answer: ``lr`` and its ``index`` in the sweep, or ``None`` and why not."""

    rule: str
    lr: float | None
    index: int | None
    reason: str


def suggest(
    rule: str, lrs: Sequence[float], losses: Sequence[float], *, blowup_index: int | None
) -> Suggestion:
    """Apply ``rule`` (one of :data:`RULES`) to a smoothed curve."""
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}: use one of {', '.join(RULES)}")
    if rule == "blowup_fraction":
        return _blowup_fraction(lrs, blowup_index)
    n = _finite_prefix(losses)
    if n < MIN_POINTS:
        return Suggestion(rule, None, None, f"only {n} finite points (need {MIN_POINTS})")
    curve = list(losses[:n])
    if _is_flat(curve):
        return Suggestion(rule, None, None, "flat curve: the loss did not move over the sweep")
    if rule == "steepest":
        return _steepest(lrs, curve)
    if rule == "valley":
        return _valley(lrs, curve)
    return _min_div_10(lrs, curve)


def _finite_prefix(losses: Sequence[float]) -> int:
    """Number of leading finite losses (the sweep stops at the first non-finite one)."""
    for i, value in enumerate(losses):
        if not math.isfinite(value):
            return i
    return len(losses)


def _is_flat(curve: Sequence[float]) -> bool:
    lo, hi = min(curve), max(curve)
    return hi - lo <= FLAT_REL * max(abs(hi), abs(lo), 1e-12)


def slopes(lrs: Sequence[float], curve: Sequence[float]) -> list[float]:
    """d loss / d log(lr): central differences inside, one-sided at the two ends."""
    x = [math.log(lr) for lr in lrs[: len(curve)]]
    n = len(curve)
    out = [(curve[1] - curve[0]) / (x[1] - x[0])]
    out += [(curve[i + 1] - curve[i - 1]) / (x[i + 1] - x[i - 1]) for i in range(1, n - 1)]
    out.append((curve[-1] - curve[-2]) / (x[-1] - x[-2]))
    return out


def _steepest(lrs: Sequence[float], curve: list[float]) -> Suggestion:
    start, end = STEEPEST_SKIP
    if len(curve) - start - end < 2:
        # torch-lr-finder would fail here too; fall back to the whole curve rather than nothing
        start, end = 0, 0
    window = curve[start : len(curve) - end]
    grads = slopes(lrs[start:], window)
    best = start + min(range(len(grads)), key=grads.__getitem__)
    if grads[best - start] >= 0:
        return Suggestion("steepest", None, None, "the loss never falls")
    return Suggestion("steepest", lrs[best], best, f"steepest descent at step {best}")


def _valley(lrs: Sequence[float], curve: list[float]) -> Suggestion:
    """Middle of the longest decreasing subsequence after the plateau (fastai's ``valley``).

    The descent starts after the last point still at the plateau's level (the median of the
    first tenth, less ``PLATEAU_EXIT`` of the total drop). At tiny LRs the smoothed loss creeps
    and wobbles; counting that as descent puts the valley decades too low.
    """
    top = statistics.median(curve[: max(1, len(curve) // 10)])
    low = min(curve)
    lowest = curve.index(low)
    if low >= top:
        return Suggestion("valley", None, None, "the loss never falls below its starting level")
    level = top - PLATEAU_EXIT * (top - low)
    begin = max((i for i in range(lowest + 1) if curve[i] >= level), default=0)
    n = len(curve)
    run = [1] * n  # run[i]: length of the longest decreasing subsequence ending at i
    first = list(range(n))  # where that subsequence starts
    for i in range(begin, n):
        for j in range(begin, i):
            if curve[j] > curve[i] and run[j] + 1 > run[i]:
                run[i], first[i] = run[j] + 1, first[j]
    end = max(range(begin, n), key=lambda i: (run[i], -i))
    if run[end] < 2:
        return Suggestion("valley", None, None, "the loss never falls")
    start = first[end]
    index = start + (end - start) // 2
    return Suggestion("valley", lrs[index], index, f"middle of the descent {start}..{end}")


def _min_div_10(lrs: Sequence[float], curve: list[float]) -> Suggestion:
    index = min(range(len(curve)), key=curve.__getitem__)
    if index == 0:
        return Suggestion("min_div_10", None, None, "the loss is lowest at the first LR")
    return Suggestion("min_div_10", lrs[index] / 10, index, f"minimum loss at step {index}, / 10")


def _blowup_fraction(lrs: Sequence[float], blowup_index: int | None) -> Suggestion:
    if blowup_index is None:
        return Suggestion(
            "blowup_fraction", None, None, "the loss never blew up: raise end_lr or num_steps"
        )
    lr = lrs[blowup_index] * BLOWUP_FRACTION
    reason = f"loss blew up at step {blowup_index}, x{BLOWUP_FRACTION:g}"
    return Suggestion("blowup_fraction", lr, blowup_index, reason)
