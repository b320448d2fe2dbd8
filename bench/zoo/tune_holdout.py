"""The base LR of each held-out task, chosen as a user would: a quick LR sweep without lrwatch.

Every run is a ``none``-mode run (the hook attached with ``control=False``: the same training as
without lrwatch) whose event files are deleted unread; only the final validation loss is looked
at. The LR with the best mean final over seeds 0 and 1 becomes the task's ``lr`` in holdout.py
(split ``holdout``) or holdout2.py (split ``holdout2``). No ``apply`` run and no replay of
lrwatch's findings, ever: the splits stay held out.

Usage::

    .venv/bin/python bench/zoo/tune_holdout.py                    # the holdout split's tasks
    .venv/bin/python bench/zoo/tune_holdout.py --split holdout2   # the holdout2 split's tasks
    .venv/bin/python bench/zoo/tune_holdout.py --tasks hf_gpt2
"""

from __future__ import annotations

import argparse
import importlib
import math
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import holdout  # noqa: E402
import holdout2  # noqa: E402

SPLITS = {"holdout": holdout.TASKS, "holdout2": holdout2.TASKS}
TASKS = {**holdout.TASKS, **holdout2.TASKS}
GRIDS = {  # half-decade grids around each optimizer's usual range
    "lit_digits": (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0),  # 1.0 first came out at the edge
    "hf_gpt2": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
    "ae_signals": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
    "vit_digits": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
    "lstm_forecast": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1),
    "ctr_embed": (0.01, 0.03, 0.1, 0.3, 1.0),
}
SEEDS = (0, 1)


def final_val(task: str, lr: float, seed: int) -> tuple[float, float]:
    """The run's final validation loss (inf when non-finite) and the seconds its loop took."""
    t = TASKS[task]
    tmp = Path(tempfile.mkdtemp(prefix="zoo-tune-"))
    try:
        facts = importlib.import_module(t.module).train(lr, t.steps, seed, "none", tmp / "run")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # lrwatch's events: never read
    final = math.inf if facts["final_val"] is None else float(facts["final_val"])
    return final, float(facts["seconds"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--split", choices=SPLITS, default="holdout", help="sweep this split's tasks")
    ap.add_argument("--tasks", help="these tasks instead (comma-separated)")
    args = ap.parse_args()
    for task in args.tasks.split(",") if args.tasks else SPLITS[args.split]:
        means = {}
        for lr in GRIDS[task]:
            runs = [final_val(task, lr, s) for s in SEEDS]
            means[lr] = statistics.fmean(f for f, _ in runs)
            finals = [round(f, 4) for f, _ in runs]
            secs = [round(s, 1) for _, s in runs]
            print(f"{task} lr {lr:g}: final val {finals}, seconds {secs}", flush=True)
        best = min(means, key=lambda lr: means[lr])
        mean = f"mean final {means[best]:.4f}"
        print(f"{task}: best lr {best:g} ({mean}); the registry has {TASKS[task].lr:g}")


if __name__ == "__main__":
    main()
