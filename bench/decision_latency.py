"""How fast does `lrwatch serve` decide, and what does it cost while nothing happens?

1. Decision latency: a real ``lrwatch serve LOGDIR --apply`` subprocess watches a log directory.
   Per trial, a new run gets a short healthy history written with lrwatch's own event writer
   (loss, LR, grad norm, non-finite flag; the tags the hook writes); once the daemon has read it,
   one more event with a NaN loss is appended and flushed. Latency = the ``wall_time`` of the
   daemon's decision in the run's audit log minus the moment the flush returned (the control
   file's mtime is reported too). inotify (default) and ``--poll`` are measured in turn, median
   and p90 over the trials. The anchor is TensorBoard's own reload: every 5 s by default, so a
   new point shows after 2.5 s on average.
2. Idle CPU: the daemon watches many finished runs (100 by default) and nothing is written; its
   CPU time (utime + stime from /proc/PID/stat) is sampled over a window, per second.

Not counted: the hook's own flush interval (``flush_secs``, 1 s by default in ``lrwatch.watch``;
lower it for faster reactions), which comes before the flush measured here.

Usage::

    PYTHONPATH=. python bench/decision_latency.py --quick     # < 1 min
    PYTHONPATH=. python bench/decision_latency.py             # 15 trials, 100 runs x 30 s
    mkdir /tmp/base && git archive main | tar -x -C /tmp/base
    PYTHONPATH=. python bench/decision_latency.py --baseline /tmp/base   # before/after
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lrwatch import schema  # noqa: E402
from lrwatch.daemon.outputs import read_audit  # noqa: E402
from lrwatch.daemon.watched_run import STATE_FILENAME  # noqa: E402
from lrwatch.events.writer import EventWriter  # noqa: E402

HISTORY = 40  # healthy steps before the NaN: enough for every detector's warm-up
# The hook's order: its per-step lrwatch/lr row comes last, which tells the daemon the step is
# complete (without it the NaN step would wait for the next step's rows).
TAGS = [schema.LOSS, schema.NONFINITE, schema.GRAD_NORM, schema.LR]
TICKS = os.sysconf("SC_CLK_TCK")
PHASE = 1.0  # seconds: NaN written at a uniform random moment after the daemon's last pass


def wait_until(cond: Callable[[], Any], timeout: float, what: str, *, every: float = 0.002) -> Any:
    tick = threading.Event()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        tick.wait(every)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def start_daemon(
    logdir: Path, poll: float | None, log: Path, root: Path = ROOT, *, verbose: bool = False
) -> subprocess.Popen[bytes]:
    """``lrwatch serve --apply`` from the source tree ``root`` (this one, or a baseline's)."""
    args = [sys.executable, "-m", "lrwatch", *(["-vv"] if verbose else []), "serve"]
    args += [str(logdir), "--apply"]
    if poll is not None:
        args += ["--poll", str(poll)]
    env = {**os.environ, "PYTHONPATH": str(root)}
    with open(log, "ab") as out:  # cwd: `-m` puts it first on sys.path
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root)


def stop_daemon(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def write_history(run_dir: Path, steps: int) -> EventWriter:
    """A healthy run: a slowly falling loss, constant LR, ordinary grad norms."""
    writer = EventWriter(run_dir, filename_suffix=".lrwatch")
    for step in range(1, steps + 1):
        loss = 2.0 * math.exp(-step / 50) + 0.05 * math.sin(step)
        writer.add_scalars(step, TAGS, [loss, 0.0, 1.0 + 0.1 * math.cos(step), 0.1])
    writer.flush()
    return writer


def daemon_has_read(run_dir: Path) -> bool:
    return (run_dir / schema.DAEMON_SUBRUN / STATE_FILENAME).exists()


def one_trial(logdir: Path, index: int, timeout: float) -> tuple[float, float]:
    """(flush -> audit decision, flush -> control file) in seconds, for one NaN."""
    run_dir = logdir / f"run{index:03d}"
    writer = write_history(run_dir, HISTORY)
    try:
        wait_until(lambda: daemon_has_read(run_dir), timeout, f"the daemon to read {run_dir}")
        # A random phase: right after the daemon's pass, a poller would always wait a full
        # interval; a real trainer flushes at any moment of the poll cycle.
        threading.Event().wait(random.uniform(0.0, PHASE))
        writer.add_scalars(HISTORY + 1, TAGS, [math.nan, 1.0, math.nan, 0.1])
        # A step is judged once the next step's lr row is in (the hook may still log at a step
        # after its row): the flush holds the NaN step and the one after, as a flush of a
        # trainer faster than its flush interval does.
        writer.add_scalars(HISTORY + 2, TAGS, [math.nan, 1.0, math.nan, 0.1])
        writer.flush()
        t0 = time.time()
        decision = wait_until(
            lambda: [r for r in read_audit(run_dir) if r["event"] == "decision"],
            timeout,
            f"a decision in {run_dir}",
        )[0]
        control = run_dir / schema.CONTROL_FILENAME
        wait_until(control.exists, timeout, "the control file")
        return decision["wall_time"] - t0, control.stat().st_mtime - t0
    finally:
        writer.close()


def measure_latency(
    trials: int, poll: float | None, timeout: float, root: Path = ROOT
) -> list[tuple[float, float]]:
    with tempfile.TemporaryDirectory(prefix="lrwatch-latency-") as tmp:
        logdir = Path(tmp) / "runs"
        logdir.mkdir()
        daemon = start_daemon(logdir, poll, Path(tmp) / "serve.log", root)
        try:
            one_trial(logdir, 999, timeout)  # warm-up: imports, first analysis
            return [one_trial(logdir, i, timeout) for i in range(trials)]
        except TimeoutError:
            sys.stderr.write((Path(tmp) / "serve.log").read_text()[-3000:])
            raise
        finally:
            stop_daemon(daemon)


def cpu_seconds(pid: int) -> float:
    """CPU time of a process: its threads' run time in ns (schedstat), else utime + stime.

    ``/proc/PID/stat`` counts in clock ticks (10 ms): too coarse for an idle daemon.
    """
    try:
        tasks = Path(f"/proc/{pid}/task").iterdir()
        return sum(int((t / "schedstat").read_text().split()[0]) for t in tasks) / 1e9
    except (OSError, ValueError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS


def measure_idle(
    runs: int, seconds: float, poll: float | None, timeout: float, root: Path = ROOT
) -> float:
    """CPU milliseconds per second of a daemon watching ``runs`` runs where nothing happens."""
    with tempfile.TemporaryDirectory(prefix="lrwatch-idle-") as tmp:
        logdir = Path(tmp) / "runs"
        for i in range(runs):
            write_history(logdir / f"run{i:03d}", HISTORY).close()
        daemon = start_daemon(logdir, poll, Path(tmp) / "serve.log", root)
        try:
            runs_read = lambda: all(daemon_has_read(d) for d in logdir.iterdir())  # noqa: E731
            wait_until(runs_read, timeout, "every run read", every=0.1)
            threading.Event().wait(1.0)  # let the last pass finish before the window opens
            c0, t0 = cpu_seconds(daemon.pid), time.monotonic()
            threading.Event().wait(seconds)
            c1, t1 = cpu_seconds(daemon.pid), time.monotonic()
            return 1000 * (c1 - c0) / (t1 - t0)
        finally:
            stop_daemon(daemon)


def summary(xs: list[float]) -> str:
    xs = sorted(xs)
    p90 = xs[min(len(xs) - 1, math.ceil(0.9 * len(xs)) - 1)]
    return f"{1000 * statistics.median(xs):8.1f} {1000 * p90:8.1f} {1000 * xs[-1]:8.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer trials and a short idle window")
    p.add_argument("--trials", type=int, help="latency trials per mode (default 15, quick 6)")
    p.add_argument("--runs", type=int, help="runs watched while idle (default 100, quick 50)")
    p.add_argument("--idle-seconds", type=float, help="idle window (default 30, quick 8)")
    p.add_argument("--poll", type=float, default=1.0, help="the --poll interval compared")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument(
        "--baseline",
        type=Path,
        help="another lrwatch source tree (e.g. `git archive main | tar -x -C DIR`): its daemon "
        "is measured too, in the same run, as the 'before'",
    )
    args = p.parse_args()
    trials = args.trials or (6 if args.quick else 15)
    runs = args.runs or (50 if args.quick else 100)
    idle = args.idle_seconds or (8.0 if args.quick else 30.0)
    load = os.getloadavg()[0]
    print(f"# {os.cpu_count()} CPUs, load average {load:.1f} at start (a loaded machine "
          "inflates every figure)")  # fmt: skip

    print(f"\nflush -> decision latency, ms ({trials} trials per mode; NaN loss after "
          f"{HISTORY} healthy steps)")  # fmt: skip
    print(f"{'mode':<22} {'median':>8} {'p90':>8} {'max':>8}   control file: median p90 max")
    modes: list[tuple[str, float | None]] = [
        ("inotify", None),
        (f"--poll {args.poll:g}", args.poll),
    ]
    roots = [("", ROOT)] + ([(" (baseline)", args.baseline)] if args.baseline else [])
    for name, poll in modes:
        for label, root in roots:
            res = measure_latency(trials, poll, args.timeout, root)
            print(f"{name + label:<22} {summary([d for d, _ in res])}   "
                  f"{summary([c for _, c in res])}")  # fmt: skip
    print(
        f"{'TensorBoard reload':<22} {2500.0:8.1f} {4500.0:8.1f} {5000.0:8.1f}   "
        "(anchor: default 5 s reload interval, uniform arrival)"
    )

    print(f"\nidle CPU of lrwatch serve watching {runs} runs, {idle:g} s window")
    for name, poll in modes:
        for label, root in roots:
            cost = measure_idle(runs, idle, poll, args.timeout, root)
            print(f"{name + label:<22} {cost:8.2f} ms CPU per s")


if __name__ == "__main__":
    main()
