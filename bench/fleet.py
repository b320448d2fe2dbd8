"""Fleet: one `lrwatch serve --apply` watching thousands of live runs on this machine.

A generator process writes ``--runs`` runs the way lrwatch's hook does (its encoder, its file
suffix, the four per-step tags with ``lrwatch/lr`` last): ``--history`` healthy steps before the
daemon starts, then, for ``--seconds``, one step per run every ``--step-secs`` on average (each
run at its own random phase and a jittered pace). ``--diverging`` runs, at random moments spread
over the window, write a non-finite step, flushed together with the step after it (a step is
judged once the next step's ``lrwatch/lr`` row is in; a trainer faster than its flush interval
writes them together).

Reported:

- decision latency: from that write to the daemon's decision line in the run's audit log, over
  the diverging runs (median, p99, max), in the first and the second half of the window: the
  lag, which grows when the daemon falls behind;
- healthy runs with a decision (should be none: the histories are clean);
- the daemon's CPU (share of one core) and the generator's write rate;
- memory: the daemon's RSS with the fleet minus its RSS watching an empty directory, per run.

Usage::

    PYTHONPATH=. python bench/fleet.py                                  # 10,000 runs, 120 s
    PYTHONPATH=. python bench/fleet.py --runs 200 --seconds 10 --step-secs 1   # seconds
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from decision_latency import start_daemon, stop_daemon, wait_until  # noqa: E402
from idle_cost import tree_cpu  # noqa: E402

from lrwatch import schema  # noqa: E402
from lrwatch.daemon.outputs import read_audit  # noqa: E402
from lrwatch.events.encode import encode_scalar_rows, file_version_record  # noqa: E402

TAGS = (schema.LOSS, schema.NONFINITE, schema.GRAD_NORM, schema.LR)  # the hook's order


def healthy_row(step: int, rng: random.Random) -> tuple[float, float, float, float]:
    loss = 2.0 * math.exp(-step / 300) + 0.3 + 0.02 * rng.random()
    return (loss, 0.0, 1.0 + 0.05 * rng.random(), 0.01)


NAN_ROW = (math.nan, 1.0, math.nan, 0.01)


@dataclass
class Fleet:
    """The generator's side: one file descriptor and step counter per run."""

    logdir: Path
    runs: int
    seed: int = 0
    fds: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    rng: random.Random = field(default_factory=random.Random)

    def create(self, history: int) -> None:
        self.rng.seed(self.seed)
        now = time.time()
        for i in range(self.runs):
            run = self.logdir / f"job{i // 100:03d}" / f"run{i:05d}"  # a two-level tree
            run.mkdir(parents=True)
            name = f"events.out.tfevents.{int(now)}.fleet.{i}{schema.HOOK_FILE_SUFFIX}"
            fd = os.open(run / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            rows = [healthy_row(s, self.rng) for s in range(1, history + 1)]
            walls = [now - history + s for s in range(1, history + 1)]
            steps = list(range(1, history + 1))
            os.write(fd, file_version_record(now) + encode_scalar_rows(steps, TAGS, rows, walls))
            self.fds.append(fd)
            self.steps.append(history)

    def run_dir(self, i: int) -> Path:
        return self.logdir / f"job{i // 100:03d}" / f"run{i:05d}"

    def write(self, i: int, rows: list[tuple[float, ...]]) -> float:
        """Append ``rows`` as the next steps of run ``i`` in one write; returns when it was done."""
        first = self.steps[i] + 1
        steps = list(range(first, first + len(rows)))
        now = time.time()
        os.write(self.fds[i], encode_scalar_rows(steps, TAGS, rows, [now] * len(rows)))
        self.steps[i] += len(rows)
        return time.time()

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return math.nan


def empty_rss(tmp: Path) -> float:
    """RSS of the same daemon watching an empty directory: the per-run figure's baseline."""
    empty = tmp / "empty"
    empty.mkdir()
    proc = start_daemon(empty, None, tmp / "empty.log")
    try:
        wait_until(lambda: "caught up" in (tmp / "empty.log").read_text(), 120, "start", every=0.1)
        return rss_mb(proc.pid)
    finally:
        stop_daemon(proc)


def decided(run_dir: Path) -> float | None:
    lines = [r for r in read_audit(run_dir) if r.get("event") == "decision"]
    return min(r["wall_time"] for r in lines) if lines else None


def drive(fleet: Fleet, seconds: float, step_secs: float, diverging: list[int]) -> dict[int, float]:
    """Write steps for ``seconds``; returns {diverging run: when its NaN step was complete}."""
    rng = fleet.rng
    start = time.monotonic()
    heap = sorted((start + rng.uniform(0, step_secs), i) for i in range(fleet.runs))
    div_at = {i: start + rng.uniform(0.1, 0.9) * seconds for i in diverging}
    written: dict[int, float] = {}
    import heapq

    heapq.heapify(heap)
    tick = threading.Event()
    while True:
        now = time.monotonic()
        if now - start >= seconds:
            # A diverging run whose next step fell after the window (a late divergence time,
            # or a writer loop slowed by a loaded machine) diverges now: every one is counted.
            for i in diverging:
                if i not in written:
                    written[i] = fleet.write(i, [NAN_ROW, NAN_ROW])
            return written
        while heap and heap[0][0] <= now:
            _, i = heapq.heappop(heap)
            if i in div_at and i not in written and now >= div_at[i]:
                written[i] = fleet.write(i, [NAN_ROW, NAN_ROW])
            elif i in written:
                fleet.write(i, [NAN_ROW])
            else:
                fleet.write(i, [healthy_row(fleet.steps[i] + 1, rng)])
            heapq.heappush(heap, (now + step_secs * rng.uniform(0.5, 1.5), i))
        tick.wait(0.005)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, math.ceil(q * len(xs)) - 1)] if xs else math.nan


def run_fleet(
    *, runs: int, seconds: float, step_secs: float, n_diverging: int, history: int, tmp: Path
) -> dict[str, object]:
    """Everything the report prints, as numbers (the CI test checks the counts)."""
    base_rss = empty_rss(tmp)
    fleet = Fleet(tmp / "runs", runs)
    fleet.logdir.mkdir()
    t0 = time.monotonic()
    fleet.create(history)
    created = time.monotonic() - t0
    log = tmp / "serve.log"
    proc = start_daemon(fleet.logdir, None, log)
    try:
        t0 = time.monotonic()
        wait_until(lambda: "caught up" in log.read_text(errors="replace"), 3600, "the first pass",
                   every=0.5)  # fmt: skip
        caught_up = time.monotonic() - t0
        diverging = fleet.rng.sample(range(runs), n_diverging)
        cpu0, w0 = tree_cpu(proc.pid), time.monotonic()
        writes0 = sum(fleet.steps)
        written = drive(fleet, seconds, step_secs, diverging)
        cpu, wall = tree_cpu(proc.pid) - cpu0, time.monotonic() - w0
        writes = sum(fleet.steps) - writes0
        rss = rss_mb(proc.pid)
        # Decisions on the last NaNs may still be on their way: wait for them, bounded.
        wait_until(lambda: all(decided(fleet.run_dir(i)) for i in written), 120,
                   "every diverging run's decision", every=0.2)  # fmt: skip
    finally:
        stop_daemon(proc)
        fleet.close()
    latencies = {i: decided(fleet.run_dir(i)) - t for i, t in written.items()}  # type: ignore[operator]
    order = sorted(written, key=written.__getitem__)
    halves = [order[: len(order) // 2], order[len(order) // 2 :]]
    healthy_decided = [
        i for i in range(runs) if i not in written and decided(fleet.run_dir(i)) is not None
    ]
    return {
        "runs": runs,
        "created_s": created,
        "caught_up_s": caught_up,
        "latencies": latencies,
        "halves": [[latencies[i] for i in h] for h in halves],
        "healthy_decided": healthy_decided,
        "daemon_core_share": cpu / wall,
        "writes_per_s": writes / wall,
        "rss_mb": rss,
        "base_rss_mb": base_rss,
        "kb_per_run": 1024 * (rss - base_rss) / runs,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=10_000)
    p.add_argument("--seconds", type=float, default=120.0, help="length of the live window")
    p.add_argument("--step-secs", type=float, default=10.0, help="mean seconds between steps")
    p.add_argument("--diverging", type=int, default=20)
    p.add_argument("--history", type=int, default=50, help="steps per run before the daemon")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    print(f"# {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; {args.runs} runs, "
          f"a step each every {args.step_secs:g} s, {args.diverging} diverging, "
          f"{args.seconds:g} s window")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="lrwatch-fleet-") as tmp:
        r = run_fleet(
            runs=args.runs,
            seconds=args.seconds,
            step_secs=args.step_secs,
            n_diverging=args.diverging,
            history=args.history,
            tmp=Path(tmp),
        )
    lat = list(r["latencies"].values())  # type: ignore[attr-defined]
    print(f"created in {r['created_s']:.1f} s; daemon caught up in {r['caught_up_s']:.1f} s")
    share = r["daemon_core_share"]
    print(f"writes: {r['writes_per_s']:.0f} steps/s; daemon CPU {share:.1%} of a core")
    print(f"decision latency over {len(lat)} diverging runs, ms: median "
          f"{1000 * statistics.median(lat):.0f}, p99 {1000 * pct(lat, 0.99):.0f}, "
          f"max {1000 * max(lat):.0f}")  # fmt: skip
    for name, half in zip(("first half", "second half"), r["halves"], strict=True):  # type: ignore[call-overload]
        if half:
            print(f"  {name:<12} median {1000 * statistics.median(half):.0f}, "
                  f"max {1000 * max(half):.0f} ms")  # fmt: skip
    print(f"healthy runs with a decision: {len(r['healthy_decided'])}")  # type: ignore[arg-type]
    print(f"memory: daemon RSS {r['rss_mb']:.0f} MB, {r['base_rss_mb']:.0f} MB watching nothing: "
          f"{r['kb_per_run']:.1f} kB per run")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(r, default=str, indent=1))


if __name__ == "__main__":
    main()
