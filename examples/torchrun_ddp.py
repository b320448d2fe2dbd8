"""A plain DistributedDataParallel loop under torchrun (gloo, CPU), watched by lrwatch.

Every rank calls ``lrwatch.watch`` the same way; only rank 0 writes event files. Control actions
(from ``lrwatch serve --apply`` or ``lrwatch apply``) are read by rank 0 and broadcast, so an LR
cut or a stop lands on every rank at the same optimizer step and no rank is left waiting in an
all-reduce. ``--stop-at N`` plays the daemon: rank 0 appends a stop action after step N::

    torchrun --nproc_per_node 2 examples/torchrun_ddp.py --logdir runs/ddp
    torchrun --nproc_per_node 2 examples/torchrun_ddp.py --logdir runs/ddp_stop --stop-at 15
    lrwatch analyze runs/ddp

Run without torchrun it trains as a single process (a world of one), which is how
tests/test_examples.py runs every script with ``--quick --logdir DIR``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import lrwatch
from lrwatch.control import append_action
from lrwatch.schema import ActionKind


def init_distributed() -> None:
    """torchrun's environment when there is one, else a process group of one."""
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
        return
    store = Path(tempfile.mkdtemp(prefix="lrwatch_ddp_")) / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)


def shard(rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the digits (every world-th sample), scaled to [0, 1]."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    return x[rank::world], y[rank::world]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="runs/ddp", help="run directory (rank 0 writes)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--stop-at", type=int, default=0, help="rank 0 asks to stop after step N")
    parser.add_argument("--quick", action="store_true", help="2 epochs, for tests and smoke runs")
    args = parser.parse_args()

    torch.set_num_threads(1)
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial weights on every rank
    x, y = shard(rank, world)
    model = DistributedDataParallel(
        nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    # The same number of batches on every rank, or DDP's all-reduce would wait forever.
    n_batches = min(len(x) for x, _ in (shard(r, world) for r in range(world))) // args.batch_size
    g = torch.Generator().manual_seed(rank)

    with lrwatch.watch(model, optimizer, logdir=args.logdir, criterion=loss_fn) as mon:
        for _epoch in range(2 if args.quick else args.epochs):
            order = torch.randperm(len(x), generator=g)[: n_batches * args.batch_size]
            for batch in torch.split(order, args.batch_size):
                optimizer.zero_grad()
                loss_fn(model(x[batch]), y[batch]).backward()
                optimizer.step()
                if rank == 0 and mon.step == args.stop_at:  # what the daemon would write
                    append_action(mon.run_dir, action=ActionKind.STOP, source="example")
                if mon.should_stop:  # true on every rank at the same step
                    break
            if mon.should_stop:
                break
        print(f"rank {rank}: {mon.step} steps, stopped by lrwatch: {mon.should_stop}", flush=True)

    dist.destroy_process_group()
    if rank == 0:
        print(f"\nevent files in {Path(args.logdir).resolve()}")
        print(f"look at them with:  tensorboard --logdir {args.logdir}")
        print(f"or ask lrwatch:     lrwatch analyze {args.logdir}")


if __name__ == "__main__":
    main()
