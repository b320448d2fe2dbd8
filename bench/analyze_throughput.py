"""How fast lrwatch digests a long run, end to end: read the event file, run every detector.

A run shaped like a real lrwatch run (per step: loss, non-finite flag, global grad norm, LR; every
10 steps: update ratio, weight norm and ``--layers`` tensors x 3 per-layer tags; validation loss
every 500 steps) is written as the hook writes it (one event per step, the LR row last). Then,
each in its own process (so its peak RSS is its own), on the same file in the same run:

- ``tb``: TensorBoard's ``EventAccumulator`` merely loading it (``Reload()``, every scalar kept,
  then ``Scalars()`` per tag): the anchor;
- ``read``: lrwatch's reader alone (``read_run``);
- ``point``: what ``lrwatch analyze`` does (``read_run`` + ``RunAnalyzer.feed``), point by point
  (``batch=False``, the path before batch analysis);
- ``batch``: the same with batch analysis (the default);
- ``point-polls`` / ``batch-polls``: the analyzer fed live in reads of 2,000 scalars, as the
  daemon feeds it.

Rates are scalars per CPU-second of the process's work after its imports; peak RSS is the
process's maximum. With ``--baseline DIR`` (a source tree, e.g. ``git archive main | tar -x -C
/tmp/base``) it also times whole commands as subprocesses, CPU included imports: ``lrwatch
analyze RUN --json`` on the big run, and ``lrwatch serve --once --quiet`` on ``--runs`` runs of
``--run-steps`` steps, from this tree and from the baseline's.

Usage: ``PYTHONPATH=. python bench/analyze_throughput.py [--steps 200000] [--baseline DIR]``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CASES = ("tb", "read", "point", "batch", "point-polls", "batch-polls")


def write_run(run_dir: Path, steps: int, *, layers: int = 20, seed: int = 0) -> int:
    """The run's event file, as the hook writes it; returns how many scalars it holds."""
    from lrwatch import schema
    from lrwatch.events.encode import encode_scalar_rows, file_version_record

    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(steps + 1)
    per_layer = [
        schema.per_tensor_tag(q, f"layer{i}.weight")
        for i in range(layers)
        for q in ("grad_norm", "update_ratio", "weight_norm")
    ]
    run_dir.mkdir(parents=True, exist_ok=True)
    count, parts = 0, [file_version_record(1.7e9)]
    for step in range(1, steps + 1):
        loss = 3.0 * math.exp(-step / (steps / 4)) + 1.0 + 0.1 * noise[step]
        tags = [schema.LOSS, schema.NONFINITE, schema.GRAD_NORM]
        row = [loss, 0.0, 1.0 + 0.1 * noise[step - 1]]
        if step % 10 == 0:
            tags += [schema.UPDATE_RATIO, schema.WEIGHT_NORM, *per_layer]
            row += [1e-3 * (1 + 0.1 * noise[step - 2]), 30.0, *([1.0] * len(per_layer))]
        if step % 500 == 0:
            tags.append("val/loss")
            row.append(loss)
        tags.append(schema.LR)
        row.append(1e-3)
        parts.append(encode_scalar_rows([step], tuple(tags), [row], [1.7e9 + step]))
        count += len(row)
    (run_dir / f"events.out.tfevents.1700000000.bench{schema.HOOK_FILE_SUFFIX}").write_bytes(
        b"".join(parts)
    )
    return count


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def case(name: str, run_dir: Path) -> dict[str, float]:
    """One case in this process: its CPU seconds (after imports) and what it found."""
    import scipy.stats  # noqa: F401  (import cost is not analysis cost)

    from lrwatch.analysis.analyzer import RunAnalyzer
    from lrwatch.events.reader import read_run

    if name == "tb":
        from tensorboard.backend.event_processing import event_accumulator

        t0 = cpu()
        acc = event_accumulator.EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
        acc.Reload()
        n = sum(len(acc.Scalars(tag)) for tag in acc.Tags()["scalars"])
        return {"cpu": cpu() - t0, "scalars": n}
    t0 = cpu()
    scalars = read_run(run_dir)
    out: dict[str, float] = {"scalars": len(scalars)}
    if name != "read":
        analyzer = RunAnalyzer(batch=name.startswith("batch"))
        if name.endswith("polls"):
            for i in range(0, len(scalars), 2000):
                analyzer.feed(scalars[i : i + 2000], live=True, hooked=True)
            analyzer.feed([])
        else:
            analyzer.feed(scalars)
        out.update(findings=len(analyzer.findings), decisions=len(analyzer.decisions))
    out["cpu"] = cpu() - t0
    return out


def in_child(name: str, run_dir: Path) -> dict[str, float]:
    """``case`` in a fresh interpreter: its own peak RSS."""
    code = (
        "import json, resource, sys; sys.path.insert(0, 'bench'); import analyze_throughput as b;"
        f" r = b.case({name!r}, b.Path({str(run_dir)!r}));"
        " r['rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024;"
        " print(json.dumps(r))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, cwd=ROOT)
    if done.returncode:
        raise SystemExit(done.stderr.decode())
    result: dict[str, float] = json.loads(done.stdout.decode().splitlines()[-1])
    return result


def command(root: Path, *args: str) -> tuple[float, float]:
    """CPU seconds and peak RSS (MB) of ``python -m lrwatch ARGS`` run from source tree ``root``."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lrwatch", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        cwd=root,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode not in (0, 3):  # analyze exits 3 when it decided something
        raise SystemExit(f"lrwatch {' '.join(args)} from {root} exited {proc.returncode}")
    return usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def print_cases(run_dir: Path, total: int) -> None:
    rows = {name: in_child(name, run_dir) for name in CASES}
    tb = total / rows["tb"]["cpu"]
    size = sum(f.stat().st_size for f in run_dir.iterdir())
    print(f"{total:,} scalars, {size / 1e6:.0f} MB of event file; each case in its own process")
    for name, r in rows.items():
        rate = total / r["cpu"]
        found = f"{r.get('findings', '-')} findings, {r.get('decisions', '-')} decisions"
        print(
            f"{name:<12} {r['cpu']:7.2f} CPU-s = {rate / 1e6:6.3f}M scalars/CPU-s"
            f" ({rate / tb:5.2f}x EventAccumulator)  peak RSS {r['rss_mb']:6.0f} MB  {found}"
        )
    print(
        f"batch / point: {rows['point']['cpu'] / rows['batch']['cpu']:.1f}x whole run, "
        f"{rows['point-polls']['cpu'] / rows['batch-polls']['cpu']:.1f}x in polls of 2000"
    )


def print_commands(tmp: Path, run_dir: Path, total: int, args: argparse.Namespace) -> None:
    fleet = tmp / "fleet"
    scalars = sum(
        write_run(fleet / f"run{i:03d}", args.run_steps, seed=i) for i in range(args.runs)
    )
    for label, root in (("this tree", ROOT), ("baseline", Path(args.baseline))):
        secs, rss = command(root, "analyze", str(run_dir), "--json")
        print(
            f"lrwatch analyze --json, {label:<9}: {secs:6.2f} CPU-s = "
            f"{total / secs / 1e6:.3f}M scalars/CPU-s, peak RSS {rss:.0f} MB"
        )
        shutil.rmtree(fleet / "copy", ignore_errors=True)
        shutil.copytree(fleet, fleet / "copy", ignore=shutil.ignore_patterns("copy"))
        secs, rss = command(root, "serve", "--once", "--quiet", str(fleet / "copy"))
        print(
            f"lrwatch serve --once, {label:<9}: {args.runs} runs, {scalars:,} scalars in "
            f"{secs:6.2f} CPU-s = {scalars / secs / 1e6:.3f}M scalars/CPU-s, peak RSS {rss:.0f} MB"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200_000)
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--baseline", help="a source tree to time the whole commands against")
    ap.add_argument("--runs", type=int, default=20, help="runs for serve --once")
    ap.add_argument("--run-steps", type=int, default=20_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        run_dir = tmp / "run"
        t0 = time.perf_counter()
        total = write_run(run_dir, args.steps, layers=args.layers)
        print(f"wrote {total:,} scalars in {time.perf_counter() - t0:.1f} s")
        print_cases(run_dir, total)
        if args.baseline:
            print_commands(tmp, run_dir, total, args)


if __name__ == "__main__":
    main()
