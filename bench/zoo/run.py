"""The LR-sweep zoo: every task at every LR multiplier and seed, three ways, then the scoreboard.

Usage::

    .venv/bin/python bench/zoo/run.py            # the full sweep (cached runs are not redone)
    .venv/bin/python bench/zoo/run.py --quick    # seeds 0 and 2, four multipliers: 192 runs
    .venv/bin/python bench/zoo/run.py --jobs 1   # one worker (default 2: the machine's cores)
    .venv/bin/python bench/zoo/run.py --split holdout   # only the held-out framework tasks
    .venv/bin/python bench/zoo/run.py --quick --split holdout2   # only the second held-out split

Writes ``bench/zoo/results.json`` (every run's facts and the scoreboard) and
``bench/zoo/results.md`` (the README tables); with ``--split S``, ``results_S.json`` and
``results_S.md``, so a sweep of one split leaves the others' results alone. The ``holdout`` and
``holdout2`` tasks run only when asked for (``--split S`` or ``--tasks``): each split is scored
once, at the end, and a default sweep must not print its table to whoever is tuning. Runs are
cached in ``bench/out/zoo/``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from score import (  # noqa: E402
    FRESH_TASKS,
    HELD_OUT_TASKS,
    HOLDOUT2_TASKS,
    HOLDOUT_TASKS,
    SPLIT_TASKS,
    SPLITS,
    TUNING_SEEDS,
    TUNING_TASKS,
    markdown,
    scoreboard,
)
from worker import run_job, snapshot, source_digests  # noqa: E402

MULTS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
QUICK_MULTS = (0.03, 1.0, 10.0, 100.0)
SEEDS = (0, 1, 2)
QUICK_SEEDS = (0, 2)
MODES = ("none", "apply", "plateau")
TASK_NAMES = TUNING_TASKS + HELD_OUT_TASKS + FRESH_TASKS  # the default sweep: no holdout(2)


def jobs_for(
    tasks: tuple[str, ...],
    mults: tuple[float, ...],
    seeds: tuple[int, ...],
    modes: tuple[str, ...] = MODES,
) -> list[dict[str, Any]]:
    return [
        {"task": t, "mult": m, "seed": s, "mode": mode}
        for t in tasks
        for m in mults
        for s in seeds
        for mode in modes
    ]


def sweep(jobs: list[dict[str, Any]], workers: int) -> list[dict[str, Any]]:
    """Run every job (cached ones return at once) in ``workers`` processes."""
    snap = snapshot()
    sys.path.insert(0, str(snap))  # spawned workers start with this sys.path
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(snap), os.environ.get("PYTHONPATH")])
    )
    digests = source_digests(snap / "lrwatch")
    out = []
    ctx = multiprocessing.get_context("spawn")  # workers import torch themselves
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        futures = {pool.submit(run_job, job, digests): job for job in jobs}
        for i, fut in enumerate(as_completed(futures), 1):
            r = fut.result()
            out.append(r)
            print(
                f"[{i}/{len(jobs)}] {r['task']} x{r['mult']} seed {r['seed']} {r['mode']}: "
                f"final {r['final_val']}",
                flush=True,
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="seeds 0 and 2, four multipliers")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--tasks", default=",".join(TASK_NAMES))
    ap.add_argument(
        "--split",
        choices=SPLITS,
        help="sweep only this split's tasks, show its table, write results_SPLIT.{json,md}",
    )
    ap.add_argument(
        "--show",
        choices=(*SPLITS, "all"),
        default="all",
        help="which split's table to print (tune only while tuning)",
    )
    ap.add_argument(
        "--rescore",
        action="store_true",
        help="recompute the scoreboard from results.json (with --split: its file), running nothing",
    )
    args = ap.parse_args()
    stem = f"results_{args.split}" if args.split else "results"
    show = args.split or args.show
    if args.rescore:
        doc = json.loads((HERE / f"{stem}.json").read_text())
        write(doc["runs"], doc["scope"], show, stem)
        return
    tasks = SPLIT_TASKS[args.split] if args.split else tuple(args.tasks.split(","))
    mults, seeds = (QUICK_MULTS, QUICK_SEEDS) if args.quick else (MULTS, SEEDS)
    start = time.monotonic()
    results = sweep(jobs_for(tasks, mults, seeds), args.jobs)
    scope = {
        "quick": args.quick,
        "tasks": tasks,
        "mults": mults,
        "seeds": seeds,
        "tuning": {"tasks": TUNING_TASKS, "seeds": TUNING_SEEDS},
        "fresh": FRESH_TASKS,
        "holdout": HOLDOUT_TASKS,
        "holdout2": HOLDOUT2_TASKS,
        "minutes": round((time.monotonic() - start) / 60, 1),
    }
    write(results, scope, show, stem)
    print(f"{len(results)} runs in {scope['minutes']} min")


def write(
    results: list[dict[str, Any]], scope: dict[str, Any], show: str, stem: str = "results"
) -> None:
    """Score ``results``; write ``stem``.json and ``stem``.md; print the tables asked for."""
    board = scoreboard(results)
    key = lambda r: (r["task"], r["mult"], r["seed"], r["mode"])  # noqa: E731
    doc = {"scope": scope, "scoreboard": board, "runs": sorted(results, key=key)}
    (HERE / f"{stem}.json").write_text(json.dumps(doc, indent=1))
    tables = "\n\n".join(
        f"**{split}** split\n\n{markdown(board, split)}" for split in SPLITS if board[split]
    )
    (HERE / f"{stem}.md").write_text(tables + "\n")
    shown = [s for s in SPLITS if board[s]] if show == "all" else [show]
    print("\n\n".join(f"**{s}**\n{markdown(board, s)}" for s in shown))


if __name__ == "__main__":
    main()
