"""How fast `lrwatch analyze` digests a long run: scalars per second through RunAnalyzer.feed.

A run shaped like a real lrwatch run (per step: loss, non-finite flag, LR; every 10 steps:
global grad norm, update ratio, weight norm and 50 tensors x 3 per-layer tags; validation loss
every 500 steps), about a million scalars, is built in memory and fed whole (the replay of
``lrwatch analyze``) and in poll-sized batches (the daemon). Reading the bytes is the reader's
benchmark; this one measures the analysis alone.

Usage: ``PYTHONPATH=. python bench/analyze_throughput.py [--steps 50000]``
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from lrwatch import schema
from lrwatch.analysis.analyzer import RunAnalyzer
from lrwatch.schema import Scalar


def synthetic_run(steps: int, *, layers: int = 50, seed: int = 0) -> list[Scalar]:
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(steps)
    out: list[Scalar] = []
    for step in range(1, steps + 1):
        loss = 3.0 * math.exp(-step / (steps / 4)) + 1.0 + 0.1 * noise[step - 1]
        out += [
            Scalar(schema.LOSS, step, 0.0, loss),
            Scalar(schema.NONFINITE, step, 0.0, 0.0),
            Scalar(schema.LR, step, 0.0, 1e-3),
        ]
        if step % 10 == 0:
            out += [
                Scalar(schema.GRAD_NORM, step, 0.0, 1.0 + 0.1 * noise[step - 2]),
                Scalar(schema.UPDATE_RATIO, step, 0.0, 1e-3),
                Scalar(schema.WEIGHT_NORM, step, 0.0, 30.0),
            ]
            for i in range(layers):
                for q in ("grad_norm", "update_ratio", "weight_norm"):
                    out.append(Scalar(schema.per_tensor_tag(q, f"layer{i}.weight"), step, 0.0, 1.0))
        if step % 500 == 0:
            out.append(Scalar("val/loss", step, 0.0, loss))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50_000)
    args = ap.parse_args()
    import scipy.stats  # noqa: F401  (import cost is not analysis cost)

    scalars = synthetic_run(args.steps)
    for name, batch in (("whole run", len(scalars)), ("polls of 2000", 2000)):
        analyzer = RunAnalyzer()
        t0 = time.perf_counter()
        for i in range(0, len(scalars), batch):
            analyzer.feed(scalars[i : i + batch])
        dt = time.perf_counter() - t0
        print(
            f"{name:<14} {len(scalars):>9} scalars in {dt:6.2f} s = {len(scalars) / dt / 1e3:7.0f}k"
            f" scalars/s ({len(analyzer.findings)} findings, {len(analyzer.decisions)} decisions)"
        )


if __name__ == "__main__":
    main()
