"""``lrwatch serve`` on object storage: a timed loop of pull, process, push.

Object stores have no file events and no append, so the daemon watches a local mirror of the
bucket (:class:`lrwatch.objstore.mirror.Mirror`) and this loop keeps the two in step: every
``poll`` seconds it pulls what is new (one listing, ranged reads of new event bytes), runs the
runs whose files grew (or a full pass when a new run appeared), then pushes what the pass wrote
(a control file at once). A decision therefore reaches the bucket in the same iteration as the
events that led to it; the trainer's uploader brings it down within its next control look.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from lrwatch.daemon.runs import Daemon
from lrwatch.objstore.mirror import Mirror
from lrwatch.schema import Decision

POLL_SECS = 1.0  # default --poll for URLs: one listing a second (~86k requests a day)
MIN_PAUSE = 0.05  # between two passes, even when one took longer than --poll


def sync_once(
    daemon: Daemon, mirrors: Sequence[Mirror], *, full: bool
) -> dict[Path, list[Decision]]:
    """One iteration: pull, process (every run if ``full`` or a run is new), push."""
    grown: set[Path] = set()
    for mirror in mirrors:
        grown |= mirror.pull()
    if full or any(run not in daemon.runs for run in grown):
        taken = daemon.process()
    else:
        taken = daemon.process_runs(sorted(grown))
    for mirror in mirrors:
        mirror.push()
    return taken


def follow_mirrors(
    daemon: Daemon, mirrors: Sequence[Mirror], *, wait: Callable[[float], None], poll: float
) -> None:
    """Pull, process and push every ``poll`` seconds until ``wait`` raises (a stop signal)."""
    full = True
    while True:
        start = time.monotonic()
        sync_once(daemon, mirrors, full=full)
        full = False
        # a listing every `poll` seconds, however long the pass took (at least a short pause)
        wait(max(poll - (time.monotonic() - start), MIN_PAUSE))


def push_everything(mirrors: Sequence[Mirror]) -> None:
    """On the way out: every output not sent yet, then release the mirrors."""
    for mirror in mirrors:
        mirror.push(everything=True)
        mirror.close()
