"""One rank of the sharded control test (tests/test_sharded.py runs it under torchrun, gloo).

Rank 0 writes a cut, a clip and a stop into the control file mid-run, as the daemon would.
Every rank records, per step, the LR its optimizer stepped with and the global norm of the
gradients it stepped with (torch's DTensor-aware ``clip_grad_norm_`` total, read in a step
post-hook registered before lrwatch's, so lrwatch's cut and clip are still in force), and the
step at which its loop ended. A rank that stopped alone would leave the other in a collective:
``faulthandler`` turns that into a failure with stacks.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from fsdp_worker import batch, build, shard
from torch import nn

import lrwatch
from lrwatch.control import append_action
from lrwatch.schema import ActionKind

ACTIONS = {  # step after which rank 0 writes the action
    3: {"action": ActionKind.LR_CUT, "factor": 2},
    13: {"action": ActionKind.CLIP, "max_norm": 0.05},
    23: {"action": ActionKind.STOP},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--logdir", type=Path, required=True)
    args = parser.parse_args()
    faulthandler.dump_traceback_later(120, exit=True)
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    model = shard(build())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    crit = nn.MSELoss()
    seen: dict[str, list[float]] = {"lr": [], "grad_norm": []}

    def record(optimizer: Any, a: Any, k: Any) -> None:  # runs before lrwatch's post-hook
        seen["lr"].append(optimizer.param_groups[0]["lr"])
        total = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf)
        seen["grad_norm"].append(float(total.full_tensor()))  # type: ignore[attr-defined]

    opt.register_step_post_hook(record)
    step = 0
    with lrwatch.watch(model, opt, logdir=args.logdir, criterion=crit, log_every=5) as mon:
        for step in range(1, 41):
            x, y = batch(rank, step)
            crit(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            if rank == 0 and step in ACTIONS:
                append_action(args.logdir, source="daemon", **ACTIONS[step])  # type: ignore[arg-type]
            if mon.should_stop:
                break
    result = {**seen, "last_step": step}
    (args.logdir.parent / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()
    faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
    main()
