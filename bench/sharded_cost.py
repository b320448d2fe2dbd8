"""Cost of lrwatch on a sharded (FSDP2) model: its one all-reduce a step against the step time.

Two copies of the same model, each ``fully_shard``-ed per layer and at the root, train side by
side in one ``torchrun`` job (gloo, CPU); lrwatch watches one of them (defaults: the global grad
norm every step, the update ratio and weight norms at the adaptive cadence). Blocks of steps
alternate between the copies so that a loaded machine slows both alike. Rank 0 prints wall ms
per step (collectives make ranks wait for each other, so CPU time would miss that), the cost
against the bare copy, and the packed all-reduce alone (a vector of one float per parameter
tensor and quantity), timed in the same job::

    PYTHONPATH=. python bench/sharded_cost.py [--quick] [--nproc 2] [--rounds 8] [--steps 20]

Without ``RANK`` in the environment the script launches itself under ``torchrun``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

import lrwatch


def sharded_mlp(width: int) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
    )
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


class Copy:
    def __init__(self, width: int, logdir: str | None) -> None:
        self.model = sharded_mlp(width)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.crit = nn.CrossEntropyLoss()
        self.mon = lrwatch.watch(self.model, self.opt, logdir=logdir) if logdir else None
        gen = torch.Generator().manual_seed(dist.get_rank())
        self.batches = [
            (torch.randn(64, 784, generator=gen), torch.randint(0, 10, (64,), generator=gen))
            for _ in range(4)
        ]
        self.n = 0

    def steps(self, k: int) -> float:
        """Seconds per step over ``k`` steps (wall: includes waiting for the other ranks)."""
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(k):
            x, y = self.batches[self.n % 4]
            self.n += 1
            self.crit(self.model(x), y).backward()
            self.opt.step()
            self.opt.zero_grad()
        dist.barrier()
        return (time.perf_counter() - t0) / k


def all_reduce_alone(n: int, repeats: int = 200) -> float:
    packed = torch.ones(n)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(repeats):
        dist.all_reduce(packed)
    return (time.perf_counter() - t0) / repeats


def run(args: argparse.Namespace) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        bare, watched = Copy(args.width, None), Copy(args.width, tmp)
        for c in (bare, watched):
            c.steps(3)  # warm-up
        times: dict[str, list[float]] = {"bare": [], "lrwatch": []}
        for r in range(args.rounds):
            order = [("bare", bare), ("lrwatch", watched)]
            for name, c in order if r % 2 == 0 else order[::-1]:
                times[name].append(c.steps(args.steps))
        assert watched.mon is not None
        every = watched.mon.log_every
        n_tensors = sum(1 for _ in watched.model.parameters())
        watched.mon.close()
    per_step = all_reduce_alone(n_tensors + 2)  # the gradient norms, cadence and failure slots
    logging = all_reduce_alone(4 * n_tensors + 2)  # + update, weights before and after
    if dist.get_rank() == 0:
        b, w = statistics.median(times["bare"]), statistics.median(times["lrwatch"])
        n = sum(p.numel() for p in bare.model.parameters())
        print(f"FSDP2 MLP 784-{args.width}-{args.width}-10, {n / 1e6:.2f}M params, "
              f"{dist.get_world_size()} ranks (gloo, CPU), {args.rounds} rounds x {args.steps}")
        print(f"bare step          {b * 1e3:8.2f} ms")
        print(f"lrwatch (defaults) {w * 1e3:8.2f} ms  {w / b - 1:+.1%}  (cadence {every})")
        print(f"all-reduce alone   {per_step * 1e3:8.3f} ms  {per_step / b:+.2%} of a bare step"
              f"  ({n_tensors + 2} floats, every step)")
        print(f"  on logging steps {logging * 1e3:8.3f} ms  {logging / b:+.2%}"
              f"  ({4 * n_tensors + 2} floats)")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 5 steps")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--width", type=int, default=1024)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps = 2, 5
    if "RANK" in os.environ:
        run(args)
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc_per_node", str(args.nproc), __file__, *sys.argv[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    raise SystemExit(subprocess.call(cmd, env=env))


if __name__ == "__main__":
    main()
