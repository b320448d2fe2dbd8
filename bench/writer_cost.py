"""Cost per scalar of writing TensorBoard events: SummaryWriter, EventFileWriter, lrwatch.

Run from the repository root::

    python bench/writer_cost.py            # ~1-2 min
    python bench/writer_cost.py --quick    # < 1 min

For 1, 100 and 1000 scalars per step it times, in interleaved rounds within one process (median
of the rounds):

* ``SummaryWriter.add_scalar``: one call per scalar (what people write by hand);
* TensorBoard's ``EventFileWriter``: one ``Event`` holding every value of the step;
* lrwatch's ``EventWriter.add_scalars`` with the step's values in one tensor: the caller's cost
  (the call only queues) and the end-to-end cost until ``flush()`` says it is on disk;
* ``EventWriter.add_rows`` with 64 steps per call, the monitor's pattern for per-step values;
* encoding alone: building that event with ``event_pb2`` versus lrwatch's hand encoding, which is
  why lrwatch encodes scalar events by hand.

Ratios are against ``SummaryWriter.add_scalar``. Every writer flushes at the end of a timed run,
and its flush is part of the end-to-end figure. CPU clocks (``thread_time`` for the caller,
``process_time`` for all threads) are the headline because wall time on a shared machine mostly
measures the neighbours.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from tensorboard.compat.proto import event_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from torch.utils.tensorboard import SummaryWriter

from lrwatch.events.encode import encode_scalar_rows
from lrwatch.events.writer import EventWriter

SIZES = (1, 100, 1000)
ROWS = 64  # steps per add_rows call, as the monitor batches its per-step rows


Clock = tuple[float, float, float]  # caller-thread CPU, process CPU (all threads), wall


def _now() -> Clock:
    return time.thread_time(), time.process_time(), time.perf_counter()


def _spans(t0: Clock, t1: Clock, t2: Clock) -> dict[str, float]:
    """Caller cost (its own thread's CPU) and end-to-end cost (CPU of every thread, and wall)."""
    return {
        "caller_cpu": t1[0] - t0[0],
        "total_cpu": t2[1] - t0[1],
        "caller_wall": t1[2] - t0[2],
        "total_wall": t2[2] - t0[2],
    }


def _steps(n: int, budget: int) -> int:
    return max(20, budget // n)  # the same number of scalars per case, at least 20 steps


def run_summary_writer(
    tags: list[str], values: list[float], steps: int, d: str
) -> dict[str, float]:
    w = SummaryWriter(d, flush_secs=3600)
    t0 = _now()
    for step in range(steps):
        for tag, v in zip(tags, values, strict=True):
            w.add_scalar(tag, v, step)
    t1 = _now()
    w.flush()
    t2 = _now()
    w.close()
    return _spans(t0, t1, t2)


def run_event_file_writer(
    tags: list[str], values: list[float], steps: int, d: str
) -> dict[str, float]:
    w = EventFileWriter(d, flush_secs=3600)
    t0 = _now()
    for step in range(steps):
        event = event_pb2.Event(wall_time=time.time(), step=step)
        add = event.summary.value.add
        for tag, v in zip(tags, values, strict=True):
            add(tag=tag, simple_value=v)
        w.add_event(event)
    t1 = _now()
    w.flush()
    t2 = _now()
    w.close()
    return _spans(t0, t1, t2)


def run_lrwatch(tags: list[str], values: list[float], steps: int, d: str) -> dict[str, float]:
    w = EventWriter(d, max_queue=steps + 10)
    tensors = [torch.tensor(values) for _ in range(steps)]  # the hook hands over fresh tensors
    t0 = _now()
    for step in range(steps):
        w.add_scalars(step, tags, tensors[step])
    t1 = _now()
    ok = w.flush(timeout=120.0)
    t2 = _now()
    w.close()
    assert ok and w.dropped == 0
    return _spans(t0, t1, t2)


def run_lrwatch_rows(tags: list[str], values: list[float], steps: int, d: str) -> dict[str, float]:
    """The monitor's pattern for per-step values: a batch of ROWS steps per call."""
    w = EventWriter(d, max_queue=steps + 10)
    batch = torch.tensor([values] * min(ROWS, steps))
    t0 = _now()
    for first in range(0, steps, ROWS):
        k = min(ROWS, steps - first)
        w.add_rows(range(first, first + k), tags, batch[:k].clone())
    t1 = _now()
    ok = w.flush(timeout=120.0)
    t2 = _now()
    w.close()
    assert ok and w.dropped == 0
    return _spans(t0, t1, t2)


def encode_protobuf(tags: list[str], values: list[float], steps: int) -> float:
    t0 = time.thread_time()
    for step in range(steps):
        event = event_pb2.Event(wall_time=1.0, step=step)
        add = event.summary.value.add
        for tag, v in zip(tags, values, strict=True):
            add(tag=tag, simple_value=v)
        event.SerializeToString()
    return time.thread_time() - t0


def encode_by_hand(tags: list[str], values: list[float], steps: int) -> float:
    key = tuple(tags)
    t0 = time.thread_time()
    for step in range(steps):
        encode_scalar_rows((step,), key, (values,), (1.0,))
    return time.thread_time() - t0


def measure(n: int, budget: int, rounds: int) -> dict[str, float]:
    """Median µs per scalar of every case and clock for ``n`` scalars per step."""
    tags = [f"lrwatch.grad_norm/block{i // 8}.layer{i % 8}.weight" for i in range(n)]
    values = torch.rand(n).tolist()
    steps = _steps(n, budget)
    cases: dict[str, Callable[[str], dict[str, float]]] = {
        "summary_writer": lambda d: run_summary_writer(tags, values, steps, d),
        "event_file_writer": lambda d: run_event_file_writer(tags, values, steps, d),
        "lrwatch": lambda d: run_lrwatch(tags, values, steps, d),
        "lrwatch_rows": lambda d: run_lrwatch_rows(tags, values, steps, d),
    }
    samples: dict[str, list[float]] = {}
    for _ in range(rounds):
        for name, case in cases.items():
            with tempfile.TemporaryDirectory() as d:
                for clock, seconds in case(d).items():
                    samples.setdefault(f"{name}/{clock}", []).append(seconds)
        samples.setdefault("encode/protobuf", []).append(encode_protobuf(tags, values, steps))
        samples.setdefault("encode/hand", []).append(encode_by_hand(tags, values, steps))
    return {k: statistics.median(v) / (steps * n) * 1e6 for k, v in samples.items()}


CASES = (
    ("SummaryWriter.add_scalar", "summary_writer"),
    ("EventFileWriter, one event per step", "event_file_writer"),
    ("lrwatch EventWriter.add_scalars", "lrwatch"),
    (f"lrwatch EventWriter.add_rows, {ROWS}/call", "lrwatch_rows"),
)
CLOCKS = (
    ("caller CPU (its own thread)", "caller_cpu"),
    ("end to end CPU (all threads, until flushed)", "total_cpu"),
    ("end to end wall (until flushed)", "total_wall"),
)


def report(results: dict[int, dict[str, float]]) -> None:
    cols = "".join(f"{n:>8d}/step" for n in SIZES)
    for title, clock in CLOCKS:
        print(f"\n{title}: µs per scalar, and SummaryWriter.add_scalar / case")
        print(f"{'':38s}{cols}")
        base = f"summary_writer/{clock}"
        for label, name in CASES:
            key = f"{name}/{clock}"
            cells = "".join(f"{results[n][key]:13.3f}" for n in SIZES)
            ratios = "  ".join(f"{results[n][base] / results[n][key]:.0f}x" for n in SIZES)
            print(f"{label:38s}{cells}   ({ratios})")
    print("\nencoding alone (µs per scalar, CPU): why lrwatch encodes scalar events by hand")
    for label, key in (
        ("event_pb2 build + serialise (no frame)", "encode/protobuf"),
        ("lrwatch hand encoding + framing", "encode/hand"),
    ):
        print(f"{label:38s}" + "".join(f"{results[n][key]:13.3f}" for n in SIZES))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer scalars and rounds (< 1 min)")
    args = parser.parse_args()
    budget, rounds = (4_000, 3) if args.quick else (20_000, 5)
    torch.set_num_threads(1)
    results = {n: measure(n, budget, rounds) for n in SIZES}
    print(f"median of {rounds} interleaved rounds, ~{budget} scalars per case and round")
    report(results)


if __name__ == "__main__":
    main()
