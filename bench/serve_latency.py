"""The daemon's reaction time (trainer flush -> decision) and its idle CPU while watching many runs.

Starts a real ``lrwatch serve --apply`` subprocess on a temporary logdir of ``--runs`` runs, each
with a healthy history. Then, one run at a time, a trainer-like writer appends a step whose loss
is NaN and flushes into its already open event file; the latency is the decision's wall time
in the run's audit log minus the wall time just before the write (same clock, same machine).
Between samples the daemon goes idle, so each one is a cold wake-up. Then the daemon is left
alone and its CPU time (utime + stime from /proc, 10 ms ticks) is measured over ``--idle``
seconds. Both are measured with inotify (the default) and with ``--poll 1``. Usage::

    PYTHONPATH=. python bench/serve_latency.py [--runs 50] [--samples 10] [--idle 10]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lrwatch import schema
from lrwatch.writer import EventWriter

TICKS = os.sysconf("SC_CLK_TCK")


def healthy(run_dir: Path, steps: int) -> None:
    with EventWriter(run_dir) as w:
        for step in range(1, steps + 1):
            w.add_scalars(
                step,
                [schema.LOSS, schema.GRAD_NORM, schema.LR, schema.NONFINITE],
                [2.0 / step + 0.3, 1.0 + 0.01 * (step % 5), 0.1, 0.0],
            )


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def wait_until(condition: object, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError("the daemon did not react in time")
        time.sleep(0.002)


def measure(logdir: Path, args: argparse.Namespace, extra: list[str]) -> dict[str, float]:
    runs = sorted(p for p in logdir.iterdir() if p.is_dir())
    # Opened before the daemon starts, as a trainer's file is: a sample is then one flush into
    # an existing file (a modify event), not a new file.
    writers = {run: EventWriter(run) for run in runs[: args.samples]}
    cmd = [sys.executable, "-m", "lrwatch", "serve", "--apply", *extra, str(logdir)]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    try:
        # Up: every run's state saved after the first pass.
        state = schema.DAEMON_SUBRUN + "/state.json"
        wait_until(lambda: all((r / state).exists() for r in runs), timeout=300)
        latencies = []
        for run in runs[: args.samples]:
            audit = run / "lrwatch_audit.jsonl"
            before = len(lines(audit))
            t0 = time.time()  # before the hand-off: the writer thread may write at once
            writers[run].add_scalars(
                args.steps + 1, [schema.LOSS, schema.NONFINITE, schema.LR], [math.nan, 1.0, 0.1]
            )
            writers[run].flush()
            wait_until(lambda: len(lines(audit)) > before)  # noqa: B023 (called right here)
            latencies.append(json.loads(lines(audit)[before])["wall_time"] - t0)
            # Let the pass finish and the daemon go idle, so each sample is a cold wake-up.
            state_file = run / schema.DAEMON_SUBRUN / "state.json"
            wait_until(lambda: state_file.stat().st_mtime > t0)  # noqa: B023
            time.sleep(0.3)
        c0, t0 = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(args.idle)  # measuring idle: nothing to synchronise with
        idle = (cpu_seconds(proc.pid) - c0) / (time.monotonic() - t0)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        for w in writers.values():
            w.close()
    return {
        "median_ms": 1000 * statistics.median(latencies),
        "max_ms": 1000 * max(latencies),
        "idle_cpu_ms_per_s": 1000 * idle,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--steps", type=int, default=60, help="healthy steps per run")
    parser.add_argument("--samples", type=int, default=10, help="runs that get a NaN step")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idle measurement")
    args = parser.parse_args()
    print(f"{args.runs} runs watched; {args.samples} latency samples; idle over {args.idle} s")
    print(f"{'mode':<14}{'median ms':>12}{'max ms':>10}{'idle CPU ms/s':>16}")
    for name, extra in [("inotify", []), ("--poll 1", ["--poll", "1"])]:
        with tempfile.TemporaryDirectory() as tmp:
            logdir = Path(tmp)
            for i in range(args.runs):
                healthy(logdir / f"run{i:03d}", args.steps)
            r = measure(logdir, args, extra)
        print(
            f"{name:<14}{r['median_ms']:>12.1f}{r['max_ms']:>10.1f}{r['idle_cpu_ms_per_s']:>16.2f}"
        )


if __name__ == "__main__":
    main()
