"""When the daemon looks: coalescing of write bursts, safety-net rescans, quiet runs polled less.

Timing arithmetic only (no threads, no files; the caller passes the clock), so the rules are
tested with plain numbers. Three rules, each with its bound:

- :class:`Coalescer` (file events): a wake-up after a quiet spell is served at once; while
  writes keep coming, passes are spaced so that they take at most ``DUTY`` of the wall time,
  never holding a wake-up longer than ``MAX_WINDOW``. The window therefore follows the write
  rate: zero for a lone flush, the length of a pass under a storm of them.
- :func:`rescan_interval` (file events): the full pass behind inotify, which catches what a
  file event could miss, runs as rarely as its cost requires to stay within ``IDLE_SHARE`` of a
  core, but at least every ``MAX_RESCAN`` seconds.
- :class:`QuietSchedule` (``--poll``): a directory or run that has not changed for ``age``
  seconds is looked at every ``age * QUIET_SHARE`` seconds, at least every ``poll`` and at most
  every ``QUIET_FACTOR * poll``: a write to it is seen at most an eighth of its quiet time, and
  at most ``QUIET_FACTOR * poll`` seconds, after it happened.
"""

from __future__ import annotations

import heapq
import itertools
import math

MAX_WINDOW = 0.05  # seconds a wake-up may be held under a write storm (the latency it may add)
DUTY = 0.5  # share of the wall time that event-driven passes may take while writes keep coming
IDLE_SHARE = 1e-4  # CPU seconds per second that safety-net rescans may cost: 0.1 ms/s
MIN_RESCAN = 30.0  # seconds: no more often than this, however cheap the pass
MAX_RESCAN = 600.0  # seconds: the longest a missed file event can go unnoticed
QUIET_SHARE = 0.125  # a quiet run is looked at every eighth of its quiet time...
QUIET_FACTOR = 8.0  # ...but at least every QUIET_FACTOR * poll seconds


class Coalescer:
    """How long a wake-up waits for the rest of a burst of writes.

    Example::

        pacer = Coalescer()
        time.sleep(pacer.delay(now()))      # 0 after a quiet spell
        start = now(); daemon.process(); pacer.passed(start, now())
    """

    def __init__(self, *, duty: float = DUTY, max_window: float = MAX_WINDOW) -> None:
        if not 0.0 < duty <= 1.0 or max_window < 0:
            raise ValueError(
                f"duty must be in (0, 1] and max_window >= 0, not {duty}, {max_window}"
            )
        self.duty = duty
        self.max_window = max_window
        self._ready_at = -math.inf  # the earliest moment the next pass may start

    def delay(self, now: float) -> float:
        """Seconds to wait before the next pass (0 unless the last one ended just now)."""
        return min(max(self._ready_at - now, 0.0), self.max_window)

    def passed(self, start: float, end: float) -> None:
        """Record a pass: the next one keeps the passes' share of the time within ``duty``."""
        rest = (end - start) * (1.0 - self.duty) / self.duty
        self._ready_at = end + min(rest, self.max_window)


def rescan_interval(pass_cpu: float) -> float:
    """Seconds until the next safety-net full pass, given the CPU seconds the last one took."""
    return min(max(pass_cpu / IDLE_SHARE, MIN_RESCAN), MAX_RESCAN)


class QuietSchedule:
    """When to look at each of many keys (directories, runs) again, by how long each was quiet.

    Example::

        schedule = QuietSchedule(poll=1.0)
        schedule.plan("runs/a", now=0.0, age=0.0)      # due at 1.0
        schedule.plan("runs/b", now=0.0, age=3600.0)   # quiet for an hour: due at 8.0
        schedule.due(now=1.0)                          # ["runs/a"]
    """

    def __init__(
        self, *, poll: float, quiet_share: float = QUIET_SHARE, quiet_factor: float = QUIET_FACTOR
    ) -> None:
        if poll <= 0 or quiet_share < 0 or quiet_factor < 1:
            raise ValueError("poll must be > 0, quiet_share >= 0 and quiet_factor >= 1")
        self.poll = poll
        self.quiet_share = quiet_share
        self.max_interval = quiet_factor * poll
        self._heap: list[tuple[float, int, str]] = []
        self._at: dict[str, float] = {}  # key -> its due time (older heap entries are stale)
        self._order = itertools.count()

    def interval(self, age: float) -> float:
        """Seconds between looks at a key that has been quiet for ``age`` seconds."""
        return min(max(age * self.quiet_share, self.poll), self.max_interval)

    def plan(self, key: str, *, now: float, age: float) -> None:
        """Look at ``key`` again one :meth:`interval` from ``now`` (replacing an earlier plan)."""
        self.plan_at(key, now + self.interval(max(age, 0.0)))

    def plan_at(self, key: str, when: float) -> None:
        self._at[key] = when
        heapq.heappush(self._heap, (when, next(self._order), key))

    def due(self, now: float) -> list[str]:
        """The keys due by ``now``, oldest plan first; each is unplanned until planned again."""
        out = []
        while self._heap and self._heap[0][0] <= now:
            when, _, key = heapq.heappop(self._heap)
            if self._at.get(key) == when:
                del self._at[key]
                out.append(key)
        return out

    def next_due(self) -> float:
        """When the earliest planned key is due (infinity when nothing is planned)."""
        while self._heap and self._at.get(self._heap[0][2]) != self._heap[0][0]:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else math.inf

    def forget(self, key: str) -> None:
        self._at.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self._at
