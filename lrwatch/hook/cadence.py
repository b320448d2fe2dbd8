"""When the monitor computes norms: every ``log_every`` steps, or a cadence fitted to a budget.

A logging step costs a few model-sized memory passes; an ordinary step costs the hooks' small
bookkeeping. With ``log_every="auto"`` the cadence is the smallest readable number of steps for
which both together stay within ``budget`` of the measured step time. It is kept apart from the
hooks so that the measurement (three medians) and the decision (:func:`nice`) read in one place,
and so that ``bench/hook_overhead.py`` can report exactly what the cadence saw.
"""

from __future__ import annotations

import statistics
from collections import deque
from typing import Any, Literal

MAX_EVERY = 1000  # a cadence never logs the norms less often than this
# ...and "auto" never less often than this: the update-ratio and oscillation detectors judge
# windows of 50 points, which a cadence fitted to a 1% budget on a ~1 ms CPU step (1000) left
# with the first 50 steps of a run and nothing after (bench/zoo: too-low LRs went unseen).
# Every 20 steps costs a twentieth of a logging step per step (bench/hook_overhead.py).
AUTO_MAX_EVERY = 20
# The hooks time only their own work; what they cost the rest of the step (the writer thread's
# share of the GIL, caches refilled after the norm passes) does not show there.
# bench/hook_overhead.py measured the whole cost from outside at 1.3-2.8x the hooks' own figure,
# so "auto" counts each logging step's measured work HIDDEN_COST times.
HIDDEN_COST = 2.0
# "auto" logs every one of the first DENSE_STEPS steps: the update-ratio detector judges a window
# of 50 logged points (lrwatch/analysis/detectors/ratio.py), which a budget-fitted cadence of 100
# would fill only after 5000 steps. 50 steps are 17% of a 300-step run, 5% of a 1000-step one.
DENSE_STEPS = 50


class Cadence:
    """The logging schedule of one monitor and the timings it adapts to.

    The monitor calls :meth:`start_step` first thing in the step pre-hook, :meth:`pre_done` last
    thing in it, :meth:`post_done` at the end of the post-hook and, on a logging step,
    :meth:`logged` with what the logging work cost.
    """

    def __init__(self, log_every: int | Literal["auto"], *, budget: float) -> None:
        self.auto = log_every == "auto"
        self.every = 10 if log_every == "auto" else int(log_every)
        self.next_log = 1
        self.budget = budget
        # Medians of recent samples: an evaluation pass or a checkpoint between two steps, or a
        # preempted logging step, must not swing the cadence.
        self.intervals: deque[float] = deque(maxlen=33)  # seconds per step without logging
        self.costs: deque[float] = deque(maxlen=5)  # seconds of work per logging step
        self.overheads: deque[float] = deque(maxlen=33)  # seconds in the hooks, other steps
        self.logged_last = False  # the step just taken was a logging step
        # Sharded runs: every rank must log at the same steps, but each measures its own times.
        # Rank 0's choice (``proposal``) rides on the all-reduce of the next logging step and
        # is adopted by every rank at the logging step after that: read a step late, the
        # reduced value needs no host sync.
        self.proposal = self.every
        self._agreed: Any = None
        self._t_pre = 0.0
        self._t_hooks = 0.0

    def start_step(self, now: float) -> None:
        """A step begins at ``now`` (``perf_counter``): the interval since the previous one."""
        if self._t_pre and not self.logged_last:  # an interval without logging work in it
            self.intervals.append(now - self._t_pre)
        self._t_pre, self.logged_last = now, False

    def pre_done(self, seconds: float) -> None:
        """The pre-hook took ``seconds``."""
        self._t_hooks = seconds

    def post_done(self, seconds: float) -> None:
        """The post-hook took ``seconds``: on other steps, what every step costs."""
        if not self.logged_last:
            self.overheads.append(self._t_hooks + seconds)

    def begin_logging(self, step: int) -> bool:
        """True if ``step`` logs; then a provisional next logging step is set (even if it fails)."""
        if step < self.next_log:
            return False
        self.next_log = step + self.every
        return True

    def logged(self, step: int, cost: float, *, agreed: Any = None) -> None:
        """A logging step's work took ``cost`` seconds: pick the next logging step.

        With ``"auto"``: the smallest readable cadence for which the per-step hooks plus the
        logging work spread over ``every`` steps stay within ``budget`` of the step time.
        ``agreed`` (sharded runs): the all-reduced tensor carrying rank 0's proposal.
        """
        self.logged_last = True
        self.costs.append(cost)
        if agreed is None:
            self.proposal = self.every  # set by load_state_dict, maybe
        if self.auto and len(self.intervals) >= 3:
            period = statistics.median(self.intervals)
            per_step = statistics.median(self.overheads) if self.overheads else 0.0
            left = self.budget * period - per_step  # what the logging work may take
            median_cost = HIDDEN_COST * statistics.median(self.costs)
            self.proposal = min(nice(median_cost / left) if left > 0 else MAX_EVERY, AUTO_MAX_EVERY)
        if agreed is None:
            self.every = self.proposal
        else:
            if self._agreed is not None:  # reduced a logging step ago: no wait
                self.every = max(1, min(MAX_EVERY, int(self._agreed.item())))
            self._agreed = agreed
        self.next_log = (step // self.every + 1) * self.every
        if self.auto and step < DENSE_STEPS:
            self.next_log = step + 1


def nice(x: float) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50, ... >= x, capped at MAX_EVERY: readable cadences."""
    every = 1
    while every < min(x, MAX_EVERY):
        every = every * 5 // 2 if str(every)[0] == "2" else every * 2
    return min(every, MAX_EVERY)
