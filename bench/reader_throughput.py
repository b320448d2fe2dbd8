"""Reader throughput: lrwatch's reader against TensorBoard's loaders, side by side in one run.

Writes runs of scalars (one event per scalar, and one event per step of 100 values), then times:

- TensorBoard ``EventFileLoader`` (the loader TensorBoard itself uses): iterate and decode every
  value to a float (the cheapest decode: ``tensor.float_val[0]``);
- TensorBoard ``EventAccumulator`` (legacy loader, ``Reload()`` then ``Scalars()`` per tag);
- lrwatch ``EventFileReader.read_all()`` and the ``read()`` generator, and ``read_all()`` with
  the many-value layout off (protobuf per event, as before issue 13);
- a generic pure-Python framing + CRC + protobuf field walk (what hand-parsing every field in
  Python costs; issue 13 quotes a tighter floor of 2.3M values/s on 100-value events).

Rates are per second of this process's CPU time (robust on a shared machine). The baselines run
on a smaller file (they would take minutes on a million values); rates are per
value, so the ratio is fair. Also times tailing (a poll after 100 appended events) and an empty
poll. Usage::

    PYTHONPATH=. python bench/reader_throughput.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tensorboard.backend.event_processing import event_accumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.compat.proto import event_pb2

from lrwatch.events.decode import MAX_LAYOUTS, frame_record, masked_crc
from lrwatch.events.reader import EventFileReader, RunReader

# CPU time of this process, not wall time: the benchmark machine is shared, and a reader that is
# descheduled for a while should not look slower than one that was lucky. Everything timed here
# runs on this one thread.
clock = time.process_time


def event_records(n_values: int, per_event: int, *, first_step: int = 0) -> bytes:
    """Framed events holding ``n_values`` simple-value scalars, ``per_event`` per event."""
    tags = [
        f"lrwatch/grad_norm/layer{j}" if per_event > 1 else "lrwatch/loss" for j in range(per_event)
    ]
    out = []
    for i in range(first_step, first_step + n_values // per_event):
        ev = event_pb2.Event(wall_time=1.7e9 + i * 0.01, step=i)
        for j, tag in enumerate(tags):
            ev.summary.value.add(tag=tag, simple_value=1.0 / (i + j + 1))
        out.append(frame_record(ev.SerializeToString()))
    return b"".join(out)


def write_run(run_dir: Path, n_values: int, per_event: int) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "events.out.tfevents.1700000000.bench"
    header = event_pb2.Event(wall_time=1.7e9, file_version="brain.Event:2")
    path.write_bytes(frame_record(header.SerializeToString()) + event_records(n_values, per_event))
    return path


def time_reader(path: Path) -> float:
    """Seconds for lrwatch to read ``path`` whole (reusable for end-to-end benchmarks)."""
    start = clock()
    EventFileReader(path).read_all()
    return clock() - start


class _NoManyLayouts(dict[bytes, list[object]]):
    """A reader's many-value layouts that never learn: every event goes through protobuf."""

    def get(self, key: object, default: object = None) -> None:  # type: ignore[override]
        return None

    def values(self) -> list[range]:  # type: ignore[override]
        return [range(MAX_LAYOUTS)]  # "full": decode.learn_many learns nothing more


def time_reader_protobuf(path: Path) -> float:
    """lrwatch's reader with the many-value layout off: protobuf per event (before issue 13)."""
    start = clock()
    reader = EventFileReader(path)
    reader._many = _NoManyLayouts()  # type: ignore[assignment]
    reader.read_all()
    return clock() - start


def _varint(buf: bytes, p: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        b = buf[p]
        value |= (b & 0x7F) << shift
        p += 1
        if b < 0x80:
            return value, p
        shift += 7


def time_python_floor(path: Path) -> float:
    """The floor of issue 13: frame, check both CRCs, and walk the protobuf fields in Python.

    Generic over field order (a loop over tags and wire types), simple_value only, no checks
    beyond the CRCs: what any pure-Python reader must at least do per record and per value.
    """
    start = clock()
    buf, out, pos = path.read_bytes(), [], 0
    head, f32, f64 = struct.Struct("<QI").unpack_from, struct.Struct("<f"), struct.Struct("<d")
    while pos + 12 <= len(buf):
        length, hcrc = head(buf, pos)
        assert masked_crc(buf[pos : pos + 8]) == hcrc
        data = buf[pos + 12 : pos + 12 + length]
        assert masked_crc(data) == struct.unpack_from("<I", buf, pos + 12 + length)[0]
        pos += 16 + length
        p, step, wall = 0, 0, 0.0
        while p < len(data):
            key, p = _varint(data, p)
            if key == 0x09:
                wall = f64.unpack_from(data, p)[0]
                p += 8
            elif key == 0x10:
                step, p = _varint(data, p)
            elif key & 7 == 2:
                n, p = _varint(data, p)
                end, sub = p + n, p
                if key >> 3 == 5:  # summary: values
                    while sub < end:
                        _, sub = _varint(data, sub)
                        m, sub = _varint(data, sub)
                        vend, tag, val = sub + m, "", 0.0
                        while sub < vend:
                            k, sub = _varint(data, sub)
                            if k == 0x0A:
                                t, sub = _varint(data, sub)
                                tag, sub = data[sub : sub + t].decode(), sub + t
                            elif k == 0x15:
                                val, sub = f32.unpack_from(data, sub)[0], sub + 4
                        out.append((tag, step, wall, val))
                p = end
    return clock() - start


def time_reader_generator(path: Path) -> float:
    start = clock()
    for _ in EventFileReader(path).read():
        pass
    return clock() - start


def time_event_file_loader(path: Path) -> float:
    start = clock()
    for event in EventFileLoader(str(path)).Load():
        for value in event.summary.value:
            float(value.tensor.float_val[0])
    return clock() - start


def time_event_accumulator(path: Path) -> float:
    start = clock()
    acc = event_accumulator.EventAccumulator(str(path.parent), size_guidance={"scalars": 0})
    acc.Reload()
    for tag in acc.Tags()["scalars"]:
        [s.value for s in acc.Scalars(tag)]
    return clock() - start


def interleaved_rates(
    timers: dict[str, tuple[Callable[[Path], float], Path, int]], rounds: int
) -> dict[str, float]:
    """Best values/s of each timer over ``rounds`` interleaved rounds (fair on a loaded machine)."""
    best = {name: float("inf") for name in timers}
    for _ in range(rounds):
        for name, (fn, path, _n) in timers.items():
            best[name] = min(best[name], fn(path))
    return {name: timers[name][2] / best[name] for name in timers}


def tailing(path: Path, per_event: int, *, rounds: int = 7) -> tuple[float, float, float]:
    """Median seconds: lrwatch poll after 100 appended events, EventFileLoader, empty poll."""
    run = RunReader(path.parent)
    run.poll()
    loader = EventFileLoader(str(path))
    for _ in loader.Load():
        pass
    ours, theirs, empties = [], [], []
    for r in range(rounds):
        with open(path, "ab") as f:
            f.write(event_records(100 * per_event, per_event, first_step=10**7 + 1000 * r))
        start = clock()
        new = run.poll()
        ours.append(clock() - start)
        assert len(new) == 100 * per_event
        start = clock()
        for event in loader.Load():
            for value in event.summary.value:
                float(value.tensor.float_val[0])
        theirs.append(clock() - start)
        start = clock()
        for _ in range(100):  # one empty poll is too short for the CPU clock
            run.poll()
        empties.append((clock() - start) / 100)
    return statistics.median(ours), statistics.median(theirs), statistics.median(empties)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small files, well under a minute")
    args = parser.parse_args()
    n_ours, n_base, rounds = (100_000, 20_000, 3) if args.quick else (1_000_000, 50_000, 2)
    print(f"values: lrwatch {n_ours:,}, TensorBoard baselines {n_base:,} (rates are per value)")
    with tempfile.TemporaryDirectory() as tmp:
        for per_event in (1, 100):
            big = write_run(Path(tmp, f"big{per_event}"), n_ours, per_event)
            small = write_run(Path(tmp, f"small{per_event}"), n_base, per_event)
            rates = interleaved_rates(
                {
                    "tensorboard EventFileLoader": (time_event_file_loader, small, n_base),
                    "tensorboard EventAccumulator": (time_event_accumulator, small, n_base),
                    "lrwatch read_all(), same file": (time_reader, small, n_base),
                    "lrwatch read_all()": (time_reader, big, n_ours),
                    "lrwatch, protobuf per event (before)": (time_reader_protobuf, big, n_ours),
                    "generic Python field walk + CRCs": (time_python_floor, big, n_ours),
                    "lrwatch read() generator, same file": (time_reader_generator, small, n_base),
                },
                rounds,
            )
            efl = rates["tensorboard EventFileLoader"]
            print(f"\n{per_event} value(s) per event, {big.stat().st_size / 1e6:.1f} MB file")
            for name, rate in rates.items():
                print(
                    f"  {name:36s} {rate / 1e3:10.1f}k values/s"
                    f"   {rate / efl:6.1f}x EventFileLoader"
                )
            ours, theirs, empty = tailing(small, per_event)
            print(
                f"  tail 100 appended events: lrwatch {ours * 1e3:.2f} ms, "
                f"EventFileLoader {theirs * 1e3:.2f} ms; empty poll {empty * 1e6:.1f} us (medians)"
            )


if __name__ == "__main__":
    main()
