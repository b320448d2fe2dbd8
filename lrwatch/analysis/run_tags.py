"""Which tag of a run plays which role, learned in step order, and how many points each has.

The analyzer's bookkeeping that is not history: the roles change when a new tag shows up (a
validation loss replaces the training loss as the monitored metric), and the point counts pace
the strided detectors.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from lrwatch import schema
from lrwatch.analysis import roles
from lrwatch.analysis.history import History
from lrwatch.analysis.roles import Role
from lrwatch.schema import Scalar


@dataclass
class RunTags:
    """The tags of one run and their roles, as far as the run has been read."""

    tags: set[str] = field(default_factory=set)  # every tag of the run
    known: set[str] = field(default_factory=set)  # tags that can play a role, seen so far
    roles: dict[Role, str] = field(default_factory=dict)
    by_tag: dict[str, list[Role]] = field(default_factory=dict)
    useful: dict[str, bool] = field(default_factory=dict)  # cache of is_useful
    counts: dict[str, int] = field(default_factory=dict)

    def is_useful(self, tag: str, *, metric: str | None) -> bool:
        """Whether ``tag`` can play a role at all (per-layer tags, for instance, cannot)."""
        hit = self.useful.get(tag)
        if hit is None:
            hit = self.useful[tag] = (
                tag in (metric, schema.LR_FACTOR) or roles.role_of(tag) is not None
            )
        return hit

    def learn(self, tags: Iterable[str], *, metric: str | None) -> None:
        """Take tags seen at this step; new ones may reassign the roles."""
        new = set(tags) - self.known
        if new:
            self.known |= new
            self.roles = roles.assign(self.known, metric=metric)
            self.by_tag = {}
            for role, tag in self.roles.items():
                self.by_tag.setdefault(tag, []).append(role)

    def reset(
        self,
        *,
        tags: Iterable[str],
        known: Iterable[str],
        counts: dict[str, int],
        metric: str | None,
    ) -> None:
        """Restore saved tags; roles are derived from ``known`` again, as when first learned."""
        self.tags, self.known, self.roles, self.by_tag = set(tags), set(), {}, {}
        self.useful, self.counts = {}, dict(counts)
        self.learn(known, metric=metric)

    def touch(self, points: Iterable[Scalar]) -> dict[Role, Scalar]:
        """Count one step's points; returns the roles that got a new point, with that point."""
        touched: dict[Role, Scalar] = {}
        for p in points:
            for role in self.by_tag.get(p.tag, ()):
                touched[role] = p
            self.counts[p.tag] = self.counts.get(p.tag, 0) + 1
        return touched

    def metric(self, configured: str | None) -> str | None:
        """The monitored metric: the configured one, else validation loss, else the loss."""
        return configured or self.roles.get("metric") or self.roles.get("loss")

    def window(self, history: History, role: Role, n: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The last ``n`` points of the tag playing ``role``; None while no tag plays it."""
        tag = self.roles.get(role)
        return None if tag is None else history.window(tag, n)
