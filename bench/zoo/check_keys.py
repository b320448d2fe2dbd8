"""Check that a change to the zoo kept the cache key of every run it should not retrain.

Computes the key of every job (all multipliers, seeds, modes and parts) of the tasks a git
revision's zoo knew, once with that revision's ``bench/zoo`` and once with this checkout's, both
against this checkout's lrwatch (so only the zoo's own change can move a key), in two processes
(the modules share names). Prints how many keys moved, and how many of this checkout's keys
name a run already in a cache directory, if one is given.

Usage::

    .venv/bin/python bench/zoo/check_keys.py --rev main --cache /work/main/bench/out/zoo/cache
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent

KEYS = """
import json, sys
sys.path.insert(0, sys.argv[1])
import run, worker
tasks = json.loads(sys.argv[3])
digests = worker.source_digests(__import__("pathlib").Path(sys.argv[2]))
keys = {}
for job in run.jobs_for(tuple(tasks), run.MULTS, run.SEEDS):
    for part in ("train", "replay") if job["mode"] == "none" else ("train",):
        keys[f"{job['task']} {job['mult']} {job['seed']} {job['mode']} {part}"] = (
            worker.job_key(job, digests, part) + (".replay" if part == "replay" else "")
        )
print(json.dumps(keys))
"""
TASKS = """
import json, sys
sys.path.insert(0, sys.argv[1])
import run, score
print(json.dumps(sorted(set(run.TASK_NAMES).union(*score.SPLIT_TASKS.values()))))
"""


def zoo_at(rev: str, dest: Path) -> Path:
    """``bench/zoo``'s Python files at ``rev``, written into ``dest``."""
    names = subprocess.run(
        ["git", "ls-tree", "--name-only", rev, "bench/zoo/"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    for name in (n for n in names if n.endswith(".py")):
        text = subprocess.run(
            ["git", "show", f"{rev}:{name}"], cwd=ROOT, check=True, capture_output=True, text=True
        ).stdout
        (dest / Path(name).name).write_text(text)
    return dest


def python(*args: str) -> str:
    out = subprocess.run([sys.executable, *args], check=True, capture_output=True, text=True)
    return out.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rev", default="main", help="the revision whose tasks' keys must not move")
    ap.add_argument("--cache", type=Path, help="a cache directory to look the keys up in")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old_zoo = zoo_at(args.rev, Path(tmp))
        tasks = python("-c", TASKS, str(old_zoo))
        lw = str(ROOT / "lrwatch")
        old = json.loads(python("-c", KEYS, str(old_zoo), lw, tasks))
    new = json.loads(python("-c", KEYS, str(HERE), lw, tasks))
    moved = sorted(job for job in old if old[job] != new.get(job))
    print(f"{len(old)} keys of {len(json.loads(tasks))} tasks at {args.rev}: {len(moved)} moved")
    for job in moved[:20]:
        print(f"  moved: {job}")
    if args.cache is not None:
        cached = {p.name.removesuffix(".json") for p in args.cache.glob("*.json")}
        print(f"{sum(k in cached for k in new.values())} of them name a run in {args.cache}")
    sys.exit(1 if moved else 0)


if __name__ == "__main__":
    main()
