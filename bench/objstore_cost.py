"""What an object-store logdir costs the trainer, and how fast a decision travels through it.

Against a real S3-compatible server (moto's server mode, ``moto[server]``) in its own process
on this machine, so its CPU is not counted as the trainer's. Each part prints its baseline,
measured in the same run:

1. **Hook cost**: the training process's CPU time (every thread: the writer, the uploader and
   fsspec's I/O loop included) per step of a real MLP training, with no lrwatch, with a local
   logdir and with ``logdir="s3://..."``, rounds interleaved; the extra CPU of s3 over local.
   Wall time of ``mon.close()`` (the last upload) is printed too.
2. **Segments vs whole-file re-uploads**: events written at a fixed rate (``--rate`` rows of
   100 scalars a second) for ``--seconds`` through the uploader with different segment sizes,
   ``whole`` being one object re-uploaded whole at every upload; bytes sent, PUT requests, and
   the process's CPU above writing the same events to a local file only.
3. **Flush to decision**: a run written as the hook writes it (event writer + uploader), one
   NaN step flushed; the time until the daemon's control object is in the bucket, and until the
   trainer's spool holds it (what the hook's controller reads), for ``serve --apply --poll P
   s3://...``; the baseline is ``serve --apply`` with inotify on a local directory (the same
   trial as ``bench/decision_latency.py``).
4. **Idle**: the daemon's CPU per second while ``--runs`` quiet runs sit in the bucket
   (``serve --poll P s3://...``: one listing a poll), against ``serve --poll P`` on the same
   runs in a local directory.

Usage::

    PYTHONPATH=. python bench/objstore_cost.py --quick     # ~2 min
    PYTHONPATH=. python bench/objstore_cost.py             # ~6 min
"""

from __future__ import annotations

import argparse
import math
import os
import random
import socket
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
sys.path.insert(0, str(ROOT / "bench"))

from decision_latency import (  # noqa: E402
    HISTORY,
    TAGS,
    one_trial,
    start_daemon,
    stop_daemon,
    wait_until,
)

from lrwatch import schema  # noqa: E402
from lrwatch.daemon.watched_run import STATE_FILENAME  # noqa: E402
from lrwatch.events.writer import EventWriter  # noqa: E402
from lrwatch.objstore import store, upload  # noqa: E402
from lrwatch.objstore.location import local_copy  # noqa: E402

BUCKET = "lrwatch-bench"


def start_moto(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    """moto's S3 server in its own process; the environment points botocore at it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = open(tmp / "moto.log", "wb")  # noqa: SIM115  kept open for the server's life
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint, LRWATCH_SPOOL=str(tmp / "spool"),
        LRWATCH_STATE_DIR=str(tmp / "state"),
    )  # fmt: skip
    import boto3

    client = boto3.client("s3")

    def up() -> bool:
        try:
            client.create_bucket(Bucket=BUCKET)
        except Exception:  # noqa: BLE001  not listening yet
            return False
        return True

    wait_until(up, 60, "moto's server", every=0.2)
    return proc, endpoint


# ------------------------------------------------------------------------------- 1. hook
def hook_cost(rounds: int, steps: int) -> None:
    import torch

    import lrwatch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y = torch.randn(64, 784), torch.randint(0, 10, (64,))
    loss_fn = torch.nn.CrossEntropyLoss()
    tmp = Path(os.environ["LRWATCH_SPOOL"]).parent

    def one(case: str, n: int) -> tuple[float, float]:
        model = torch.nn.Sequential(
            torch.nn.Linear(784, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10)
        )
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        run = f"{case}-{random.getrandbits(32):08x}"
        logdir = {"local": str(tmp / "local" / run), "s3": f"s3://{BUCKET}/hook/{run}"}.get(case)
        mon = lrwatch.watch(model, opt, logdir=logdir, criterion=loss_fn) if logdir else None

        def step() -> None:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()

        # Steady state: past the dense start of log_every="auto" and the uploader's connection
        # (its one-off cost is printed apart).
        up = getattr(mon, "_uploader", None)
        t0 = time.monotonic()
        while (up is not None and not up.pulled.is_set()) or time.monotonic() - t0 < 0.5:
            step()
        for _ in range(60):
            step()
        c0 = time.process_time()
        for _ in range(n):
            step()
        cpu = time.process_time() - c0
        t0 = time.monotonic()
        if mon is not None:
            mon.close()
        return cpu / n, time.monotonic() - t0

    c0 = time.process_time()
    store.Store(f"s3://{BUCKET}/hook").get("nothing")  # imports, client, credentials: once a run
    connect = time.process_time() - c0
    one("s3", 60)  # warm-up
    per: dict[str, list[float]] = {"bare": [], "local": [], "s3": []}
    closes: dict[str, list[float]] = {"local": [], "s3": []}
    for _ in range(rounds):
        for case in random.sample(list(per), 3):
            cpu, close = one(case, steps)
            per[case].append(cpu)
            if case in closes:
                closes[case].append(close)
    bare = statistics.median(per["bare"])
    print(f"\n1. hook cost: MLP 784-512-10, Adam, batch 64, {steps} steps x {rounds} rounds, "
          f"steady state")  # fmt: skip
    print("   case    CPU ms/step (median)   above bare    mon.close() wall")
    for case, xs in per.items():
        extra = statistics.median(xs) - bare
        close = f"{1000 * statistics.median(closes[case]):8.1f} ms" if case in closes else ""
        print(
            f"   {case:6} {1000 * statistics.median(xs):12.3f}   {1000 * extra:+12.3f} ms   {close}"
        )
    local = statistics.median(per["local"]) - bare
    s3 = statistics.median(per["s3"]) - bare
    extra = s3 - local
    print(f"   s3 over local: {1000 * extra:+.3f} ms/step, {100 * extra / bare:+.2f}% of a bare "
          f"step ({s3 / max(local, 1e-9):.2f}x local's extra)")  # fmt: skip
    print(f"   once per run, on the upload thread: the first request (imports, client, "
          f"credentials) {1000 * connect:.0f} ms of CPU")  # fmt: skip


# ------------------------------------------------------------------------------- 2. segments
def segment_cost(seconds: float, rate: int, sizes: list[str]) -> None:
    sent = {"bytes": 0, "puts": 0}
    real_put = store.Store.put

    def counting_put(self: Any, key: str, data: bytes) -> None:
        sent["bytes"] += len(data)
        sent["puts"] += 1
        real_put(self, key, data)

    store.Store.put = counting_put  # type: ignore[method-assign]
    tags = [f"bench/t{i:03d}" for i in range(100)]
    tmp = Path(os.environ["LRWATCH_SPOOL"]).parent / "segments"

    def write(spool: Path, uploader: upload.Uploader | None) -> tuple[float, int]:
        writer = EventWriter(spool, filename_suffix=".lrwatch",
                             on_write=uploader.notify if uploader else None)  # fmt: skip
        if uploader is not None:  # its one-off connection is part 1's figure, not this one
            uploader.pulled.wait(60)
        c0, t0, step = time.process_time(), time.monotonic(), 0
        tick = threading.Event()
        while time.monotonic() - t0 < seconds:
            for _ in range(rate // 20):  # 20 hand-offs a second, as a trainer's flush would do
                step += 1
                writer.add_scalars(step, tags, [math.sin(step + i) for i in range(100)])
            tick.wait(0.05)
        writer.close()
        if uploader is not None:
            uploader.close(timeout=120)
        return time.process_time() - c0, writer.path.stat().st_size

    base_cpu, size = write(tmp / "local-only", None)
    print(f"\n2. segments vs whole-file re-uploads: {rate} rows of 100 scalars/s for "
          f"{seconds:g} s ({size / 1e6:.1f} MB written, uploads at most every "
          f"{upload.MIN_PUT_SECS} s)")  # fmt: skip
    print(
        f"   baseline, local file only: {1000 * base_cpu / (size / 1e6):.1f} CPU ms per MB written"
    )
    print("   segment size   MB sent   sent/written   PUTs   objects   CPU ms/MB above local")
    for label in sizes:
        upload.SEGMENT_BYTES = 1 << 60 if label == "whole" else int(float(label) * 1024)
        sent.update(bytes=0, puts=0)
        spool = tmp / f"seg-{label}"
        uploader = upload.Uploader(
            spool, f"s3://{BUCKET}/seg/{label}", put_secs=0.25, control=False
        )
        cpu, size = write(spool, uploader)
        objects = len(list(store.Store(f"s3://{BUCKET}/seg/{label}").listing()))
        name = "whole file" if label == "whole" else f"{label} KiB"
        above = 1000 * (cpu - base_cpu) / (size / 1e6)
        print(f"   {name:12} {sent['bytes'] / 1e6:9.1f} {sent['bytes'] / size:12.2f}x "
              f"{sent['puts']:6d} {objects:8d}   {above:+10.1f}")  # fmt: skip
    store.Store.put = real_put  # type: ignore[method-assign]
    upload.SEGMENT_BYTES = 1 << 20


# ------------------------------------------------------------------------------- 3. latency
def s3_trial(
    url: str, spool_root: Path, mirror: Path, index: int, timeout: float
) -> tuple[float, float]:
    """(flush -> control object in the bucket, flush -> control file in the trainer's spool)."""
    import boto3

    run = f"run{index:03d}"
    spool = local_copy(spool_root, f"{url}/{run}")
    uploader = upload.Uploader(spool, f"{url}/{run}", put_secs=0.25)
    writer = EventWriter(spool, filename_suffix=".lrwatch", on_write=uploader.notify)
    client = boto3.client("s3")
    key = f"{url.removeprefix(f's3://{BUCKET}/')}/{run}/{schema.CONTROL_FILENAME}"
    try:
        for step in range(1, HISTORY + 1):
            loss = 2.0 * math.exp(-step / 50) + 0.05 * math.sin(step)
            writer.add_scalars(step, TAGS, [loss, 0.0, 1.0 + 0.1 * math.cos(step), 0.1])
        writer.flush()
        state = mirror / run / schema.DAEMON_SUBRUN / STATE_FILENAME
        wait_until(state.exists, timeout, f"the daemon to read {run}", every=0.02)
        threading.Event().wait(random.uniform(0.0, 1.0))  # a random phase of the poll cycle
        writer.add_scalars(HISTORY + 1, TAGS, [math.nan, 1.0, math.nan, 0.1])
        writer.add_scalars(HISTORY + 2, TAGS, [math.nan, 1.0, math.nan, 0.1])
        writer.flush()
        t0 = time.monotonic()

        def in_bucket() -> bool:
            try:
                client.head_object(Bucket=BUCKET, Key=key)
            except Exception:  # noqa: BLE001  not there yet
                return False
            return True

        wait_until(in_bucket, timeout, "the control object", every=0.01)
        t1 = time.monotonic()
        wait_until((spool / schema.CONTROL_FILENAME).exists, timeout, "the spool's copy")
        return t1 - t0, time.monotonic() - t0
    finally:
        writer.close()
        uploader.close()


def latency(trials: int, poll: float, timeout: float) -> None:
    tmp = Path(os.environ["LRWATCH_SPOOL"]).parent
    url = f"s3://{BUCKET}/latency"
    mirror = local_copy(Path(os.environ["LRWATCH_STATE_DIR"]) / "serve", url)
    daemon = subprocess.Popen(
        [sys.executable, "-m", "lrwatch", "serve", "--apply", "--poll", str(poll), url],
        stdout=open(tmp / "serve-s3.log", "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
        env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
    )  # fmt: skip
    spool_root = Path(os.environ["LRWATCH_SPOOL"])
    try:
        s3_trial(url, spool_root, mirror, 999, timeout)  # warm-up
        s3 = [s3_trial(url, spool_root, mirror, i, timeout) for i in range(trials)]
    except TimeoutError:
        sys.stderr.write((tmp / "serve-s3.log").read_text()[-3000:])
        raise
    finally:
        stop_daemon(daemon)  # type: ignore[arg-type]
    logdir = tmp / "local-runs"
    logdir.mkdir()
    local_daemon = start_daemon(logdir, None, tmp / "serve-local.log")
    try:
        one_trial(logdir, 999, timeout)
        local = [one_trial(logdir, i, timeout)[0] for i in range(trials)]
    finally:
        stop_daemon(local_daemon)
    print(f"\n3. flush -> decision, {trials} trials each (median / p90 / max, ms)")
    print(f"   local dir, inotify (baseline): flush -> decision     {summary(local)}")
    print(f"   s3 --poll {poll:g}: flush -> control object in bucket {summary([a for a, _ in s3])}")
    print(f"   s3 --poll {poll:g}: flush -> control file in spool    {summary([b for _, b in s3])}")
    print(f"   (the hook's own uploads add up to max(flush_secs, {upload.MIN_PUT_SECS}) s "
          f"before the flush measured here, {upload.URGENT_SECS} s for an alarm-level "
          "step)")  # fmt: skip


# ------------------------------------------------------------------------------- 4. idle
def idle(runs: int, seconds: float, poll: float, timeout: float) -> None:
    """CPU per second of ``serve --poll`` on ``runs`` quiet runs: in a bucket, and on the same
    runs in a local directory (the baseline)."""
    from decision_latency import cpu_seconds, write_history

    tmp = Path(os.environ["LRWATCH_SPOOL"]).parent
    logdir = tmp / "idle-runs"
    client = __import__("boto3").client("s3")
    for i in range(runs):
        write_history(logdir / f"run{i:04d}", HISTORY).close()
        for f in (logdir / f"run{i:04d}").iterdir():
            client.upload_file(str(f), BUCKET, f"idle/run{i:04d}/{f.name}")
    url = f"s3://{BUCKET}/idle"
    mirror = local_copy(Path(os.environ["LRWATCH_STATE_DIR"]) / "serve", url)
    out = {}
    for case, target, state in (("s3", url, mirror), ("local", str(logdir), logdir)):
        proc = subprocess.Popen(
            [sys.executable, "-m", "lrwatch", "serve", "--poll", str(poll), target],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
        )  # fmt: skip
        try:
            done = lambda state=state: all(  # noqa: E731
                (state / f"run{i:04d}" / schema.DAEMON_SUBRUN / STATE_FILENAME).exists()
                for i in range(runs)
            )
            wait_until(done, timeout, "every run read", every=0.2)
            threading.Event().wait(2 * poll)  # the last pass over
            c0, t0 = cpu_seconds(proc.pid), time.monotonic()
            threading.Event().wait(seconds)
            out[case] = 1000 * (cpu_seconds(proc.pid) - c0) / (time.monotonic() - t0)
        finally:
            stop_daemon(proc)  # type: ignore[arg-type]
    print(f"\n4. idle: serve --poll {poll:g} on {runs} quiet runs, CPU over {seconds:g} s")
    print(f"   local directory (baseline): {out['local']:7.2f} ms of CPU per second")
    print(
        f"   s3 bucket (one listing per poll): {out['s3']:7.2f} ms/s "
        f"({out['s3'] / out['local']:.1f}x)"
    )


def summary(xs: list[float]) -> str:
    xs = sorted(xs)
    p90 = xs[min(len(xs) - 1, math.ceil(0.9 * len(xs)) - 1)]
    return f"{1000 * statistics.median(xs):8.0f} {1000 * p90:8.0f} {1000 * xs[-1]:8.0f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, help="hook cost rounds (default 5, quick 3)")
    p.add_argument("--steps", type=int, help="steps per hook-cost case (default 400, quick 200)")
    p.add_argument("--seconds", type=float, help="writing time per segment size (20, quick 8)")
    p.add_argument("--rate", type=int, default=400, help="rows of 100 scalars a second")
    p.add_argument("--sizes", default="64,1024,whole", help="segment sizes in KiB, or 'whole'")
    p.add_argument("--trials", type=int, help="latency trials (default 15, quick 6)")
    p.add_argument("--poll", type=float, default=1.0, help="serve --poll for the s3 daemon")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--runs", type=int, help="quiet runs for the idle part (default 100, quick 30)")
    p.add_argument("--idle-seconds", type=float, help="idle window (default 30, quick 10)")
    p.add_argument("--only", choices=["hook", "segments", "latency", "idle"], action="append")
    a = p.parse_args()
    only: Callable[[str], bool] = lambda part: not a.only or part in a.only  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="lrwatch-objstore-") as tmp:
        moto, endpoint = start_moto(Path(tmp))
        print(f"moto S3 server at {endpoint} (own process); load average {os.getloadavg()[0]:.1f}")
        try:
            if only("hook"):
                hook_cost(a.rounds or (3 if a.quick else 5), a.steps or (200 if a.quick else 400))
            if only("segments"):
                sizes = a.sizes.split(",")
                segment_cost(a.seconds or (8.0 if a.quick else 20.0), a.rate, sizes)
            if only("latency"):
                latency(a.trials or (6 if a.quick else 15), a.poll, a.timeout)
            if only("idle"):
                runs, secs = a.runs or (30 if a.quick else 100), a.idle_seconds
                idle(runs, secs or (10.0 if a.quick else 30.0), a.poll, a.timeout * 5)
        finally:
            moto.terminate()
            moto.wait(timeout=30)


if __name__ == "__main__":
    main()
