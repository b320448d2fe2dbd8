"""Idle cost: CPU of `lrwatch serve` watching many quiet runs, next to TensorBoard's reload loop.

One log directory of ``--runs`` finished runs (40 steps of the four per-step tags each, their
files dated an hour back: runs that have been quiet for a while). Each watcher runs as its own
process on it, in turn, and its CPU time (every thread of the process and of its children, from
/proc schedstat) is sampled over the same length of window once it has read everything:

- TensorBoard's own reload loop, ``tensorboard --logdir DIR --reload_interval R``, with its Rust
  data server (the default when installed) and with ``--load_fast=false`` (the Python
  multiplexer), at ``R`` = ``--poll`` and at TensorBoard's default 5 s;
- ``lrwatch serve`` with file events (inotify) and with ``--poll``; with ``--baseline DIR``
  (another source tree, e.g. ``git archive main | tar -x -C DIR``) its daemon too, as "before".

TensorBoard rows run first, so they see the logdir without lrwatch's own sub-runs. Usage::

    PYTHONPATH=. python bench/idle_cost.py --runs 1000 --seconds 30
    PYTHONPATH=. python bench/idle_cost.py --runs 200 --seconds 10     # quick
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from decision_latency import (  # noqa: E402
    HISTORY,
    daemon_has_read,
    start_daemon,
    stop_daemon,
    wait_until,
    write_history,
)

QUIET_FOR = 3600.0  # seconds the runs' files are dated back


def tree_pids(pid: int) -> list[int]:
    """``pid`` and its descendants (TensorBoard starts its data server as a child)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return out


def tree_cpu(pid: int) -> float:
    """CPU seconds of every thread of ``pid`` and its descendants (schedstat: ns resolution)."""
    total = 0
    for p in tree_pids(pid):
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pass
    return total / 1e9


def window(pid: int, seconds: float) -> float:
    """ms of CPU per second of ``pid``'s process tree over the next ``seconds``."""
    c0, t0 = tree_cpu(pid), time.monotonic()
    threading.Event().wait(seconds)
    c1, t1 = tree_cpu(pid), time.monotonic()
    return 1000 * (c1 - c0) / (t1 - t0)


def make_logdir(root: Path, runs: int) -> Path:
    logdir = root / "runs"
    back = time.time() - QUIET_FOR
    for i in range(runs):
        run = logdir / f"run{i:04d}"
        write_history(run, HISTORY).close()
        for f in run.iterdir():
            os.utime(f, (back, back))
    return logdir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tensorboard(logdir: Path, reload: float, fast: bool, seconds: float, warmup: float) -> float:
    exe = Path(sys.executable).with_name("tensorboard")
    args = [str(exe), "--logdir", str(logdir), "--reload_interval", str(reload)]
    args += ["--port", str(free_port()), "--load_fast", "true" if fast else "false"]
    with open(logdir.parent / "tensorboard.log", "ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    try:
        threading.Event().wait(warmup)  # its first load of every run, then steady reloads
        return window(proc.pid, seconds)
    finally:
        stop_daemon(proc)


FULL_PASS = re.compile(r"full pass over \d+ runs: ([0-9.]+) ms of CPU; the next in (\d+) s")


def lrwatch(logdir: Path, poll: float | None, seconds: float, root: Path) -> tuple[float, float]:
    """(ms/s in the window, ms/s of the safety-net full passes, amortised over their interval).

    With file events, the full pass behind them may run less often than a window is long: its
    cost, from the daemon's own debug line, is added over its interval instead of being missed.
    """
    # A fresh copy per daemon (mtimes kept): "read" means its own state.json, not a previous one's.
    fresh = logdir.parent / f"copy-{time.monotonic_ns()}"
    shutil.copytree(logdir, fresh)
    logdir, log = fresh, fresh.with_suffix(".log")
    mine = root == ROOT and poll is None
    proc = start_daemon(logdir, poll, log, root, verbose=mine)
    try:
        runs = [d for d in logdir.iterdir() if d.is_dir()]
        wait_until(lambda: all(map(daemon_has_read, runs)), 600, "every run read", every=0.2)
        threading.Event().wait(3.0)  # let the last pass and the startup rescan finish
        cost = window(proc.pid, seconds)
    finally:
        stop_daemon(proc)
    passes = FULL_PASS.findall(log.read_text(errors="replace")) if mine else []
    shutil.rmtree(fresh)
    rescans = 0.0
    if passes:
        ms, every = passes[-1]
        rescans = float(ms) / float(every)
    return cost, rescans


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=30.0, help="length of each window")
    p.add_argument("--poll", type=float, default=1.0, help="--poll and TensorBoard's interval")
    p.add_argument("--baseline", type=Path, help="another lrwatch source tree, measured too")
    p.add_argument("--no-tensorboard", action="store_true")
    args = p.parse_args()
    print(f"# {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; {args.runs} quiet "
          f"runs, {args.seconds:g} s windows; ms of CPU per second")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="lrwatch-idle-") as tmp:
        logdir = make_logdir(Path(tmp), args.runs)
        warmup = max(10.0, args.runs / 50)
        if not args.no_tensorboard:
            for reload in (args.poll, 5.0):
                for fast, name in ((True, "Rust data server"), (False, "Python multiplexer")):
                    cost = tensorboard(logdir, reload, fast, args.seconds, warmup)
                    label = f"tensorboard --reload_interval {reload:g} ({name})"
                    print(f"{label:<58} {cost:8.2f}", flush=True)
        roots = [("", ROOT)] + ([(" (baseline)", args.baseline)] if args.baseline else [])
        for mode, poll in (("inotify", None), (f"--poll {args.poll:g}", args.poll)):
            for suffix, root in roots:
                cost, rescans = lrwatch(logdir, poll, args.seconds, root)
                note = f"  (+ {rescans:.3f} full passes amortised)" if rescans else ""
                label = "lrwatch serve " + mode + suffix
                print(f"{label:<58} {cost + rescans:8.2f}{note}", flush=True)


if __name__ == "__main__":
    main()
