"""One rank of the DDP test (run by tests/test_distributed.py through torchrun, gloo on CPU).

Every rank trains a DDP model watched by lrwatch; rank 0 also records what the event file must
hold, computed independently around each step, into ``expected.json``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import lrwatch
from lrwatch import schema


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--logdir", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.parallel.DistributedDataParallel(
        nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 2))
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    crit = nn.MSELoss()
    gen = torch.Generator().manual_seed(rank)
    expected: dict[str, dict[int, float]] = {
        schema.LOSS: {},
        schema.GRAD_NORM: {},
        schema.UPDATE_RATIO: {},
    }
    with lrwatch.watch(model, opt, logdir=args.logdir, criterion=crit, log_every=2) as mon:
        for step in range(1, args.steps + 1):
            x, y = torch.randn(8, 5, generator=gen), torch.randn(8, 2, generator=gen)
            loss = crit(model(x), y)
            loss.backward()  # DDP averages the gradients across ranks here
            params = list(model.parameters())
            total = torch.nn.utils.clip_grad_norm_(params, max_norm=math.inf)
            before = torch.cat([p.detach().reshape(-1).clone() for p in params])
            opt.step()
            after = torch.cat([p.detach().reshape(-1) for p in params])
            opt.zero_grad()
            expected[schema.LOSS][step] = loss.item()
            expected[schema.GRAD_NORM][step] = total.item()  # every step, as DDP averaged it
            if step == 1 or step % 2 == 0:
                ratio = (after - before).norm() / before.norm()
                expected[schema.UPDATE_RATIO][step] = ratio.item()
            assert mon.step == step
    if rank == 0:
        (args.logdir.parent / "expected.json").write_text(json.dumps(expected))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
