"""Batch analysis against the point-by-point path on every run under a directory (e.g. the zoo's).

Each run found under ``LOGDIR`` is read once and replayed by ``RunAnalyzer(batch=False)`` (the
reference) and ``RunAnalyzer(batch=True)``, fed whole and in the daemon's way (live reads of
random sizes); the findings, decisions, reasons for silence and saved states must be equal.
``tests/test_batch_analysis.py`` does the same on generated streams in CI; this runs it on
whatever real runs a machine has (``bench/zoo/run.py`` leaves hundreds in ``bench/out/zoo``).

Usage: ``PYTHONPATH=. python bench/batch_differential.py [LOGDIR] [--limit N]``
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from lrwatch.analysis.analyzer import RunAnalyzer
from lrwatch.errors import RunGone
from lrwatch.events.reader import find_runs, read_run
from lrwatch.schema import Scalar


def outcome(scalars: list[Scalar], *, batch: bool, reads: list[int] | None) -> dict[str, Any]:
    analyzer = RunAnalyzer(batch=batch)
    if reads is None:
        analyzer.feed(scalars)
    else:
        i = 0
        for size in reads:
            analyzer.feed(scalars[i : i + size], live=True, hooked=True)
            i += size
        analyzer.feed([])
    return {
        "findings": [(f.kind, f.severity, f.step, f.tag, f.message) for f in analyzer.findings],
        "evidence": json.dumps([f.evidence for f in analyzer.findings], default=str),
        "decisions": analyzer.decisions,
        "why_quiet": analyzer.why_quiet,
        "state": json.dumps(analyzer.state_dict(), sort_keys=True, default=str),
        "kinds": Counter(f.kind.value for f in analyzer.findings),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("logdir", nargs="?", default="bench/out/zoo", type=Path)
    ap.add_argument("--limit", type=int, default=0, help="at most this many runs (0: all)")
    args = ap.parse_args()
    runs = find_runs(args.logdir)[: args.limit or None]
    if not runs:
        sys.exit(f"no runs under {args.logdir}")
    rng = random.Random(0)
    kinds: Counter[str] = Counter()
    bad, scalars_total, t0 = [], 0, time.process_time()
    gone = 0
    for run in runs:
        try:
            scalars = read_run(run)
        except RunGone:  # another job's sweep removed it meanwhile
            gone += 1
            continue
        scalars_total += len(scalars)
        reads = [rng.choice([1, 7, 64, 500, 5000]) for _ in range(len(scalars))]
        for feed in (None, reads):
            ref = outcome(scalars, batch=False, reads=feed)
            got = outcome(scalars, batch=True, reads=feed)
            found = ref.pop("kinds")
            got.pop("kinds")
            kinds.update(found if feed is None else {})
            if got != ref:
                bad.append((str(run), "reads" if feed else "whole"))
    print(
        f"{len(runs)} runs, {scalars_total:,} scalars, each fed whole and in live reads: "
        f"{len(bad)} differ ({time.process_time() - t0:.0f} CPU-s; {gone} gone while reading)"
    )
    print("findings by kind (point path, fed whole):", dict(sorted(kinds.items())))
    for run, how in bad[:20]:
        print(f"  DIFFERS: {run} ({how})")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
