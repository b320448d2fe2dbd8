"""One rank of the distributed rollback test (tests/test_rollback_distributed.py, torchrun, gloo).

Every rank trains the 3-layer MLP of tests/fsdp_worker.py, sharded with FSDP2 or replicated with
DDP, under ``lrwatch.watch`` with rollback copies kept (the first step's and the newest two of
every ``EVERY`` steps: 10 here instead of lrwatch's 100, so that a run of 50 steps reaches the
copies that reuse an older copy's memory). Rank 0 writes control actions mid-run, as the daemon
would: an LR cut, a rollback to step 30 (the copy of step 30, which reused the memory of step
10's), a second rollback to 25 (the copy of step 20), a clip and a stop.

The oracle is every rank's own record, taken outside lrwatch: before the update of each step
lrwatch copies (1, 10, 20, 30), the full parameters (``full_tensor()``: a collective every
rank joins) and the full optimizer state; and the same after the update of each step that read
a rollback. Each rank also records the LR and the global gradient norm its optimizer stepped with
(a step post-hook registered before lrwatch's, so lrwatch's cut and clip are still in force),
``mon.step`` and what lrwatch's controller logged. ``faulthandler`` turns a rank left alone in a
collective into a failure with every stack instead of a hang.
"""

from __future__ import annotations

import argparse
import faulthandler
import functools
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from fsdp_worker import batch, build, inject_failure, shard
from torch import nn

import lrwatch
from lrwatch.control import append_action
from lrwatch.hook import monitor
from lrwatch.hook.snapshots import Snapshots, param_bytes
from lrwatch.schema import ActionKind

STEPS = 60
EVERY = 10  # steps between two copies
CLIP = 0.05
ACTIONS = {  # step after which rank 0 writes the action; read at the next check (every 5)
    2: {"action": ActionKind.LR_CUT, "factor": 2},
    32: {"action": ActionKind.ROLLBACK, "to_step": 30},
    37: {"action": ActionKind.ROLLBACK, "to_step": 25},
    42: {"action": ActionKind.CLIP, "max_norm": CLIP},
    47: {"action": ActionKind.STOP},
}
RECORDED = (1, 10, 20, 30)  # the steps lrwatch copies
READ_AT = (35, 40)  # the check steps that read the rollbacks


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on this rank (a DTensor's ``full_tensor()`` is a collective)."""
    gather = getattr(t, "full_tensor", None)
    return (gather() if gather is not None else t).detach().clone()


def state_of(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, dict[str, Any]]:
    """Full parameters and full optimizer state, by parameter name (every rank joins)."""
    out: dict[str, dict[str, Any]] = {}
    for name, p in model.named_parameters():
        moments = opt.state.get(p, {})
        out[name] = {"param": full(p), **{k: full(v) for k, v in sorted(moments.items())}}
    return out


class Said(logging.Handler):
    """What lrwatch logged on this rank, as (logger, message)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.name, record.getMessage()))


def inject_take_failure(spec: str, current: list[int]) -> None:
    """``RANK:STEP``: copying the weights raises on that rank at that step (say, out of memory
    on the one rank whose device is fullest)."""
    rank, step = (int(v) for v in spec.split(":"))
    if dist.get_rank() != rank:
        return
    real = Snapshots.take

    def failing(self: Snapshots, at: int, optimizer: torch.optim.Optimizer) -> None:
        if current[0] == step:
            raise RuntimeError(f"injected: no memory for the copy of step {at}")
        real(self, at, optimizer)

    Snapshots.take = failing  # type: ignore[method-assign]


def wrap(model: nn.Sequential, layout: str) -> nn.Module:
    if layout == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    return shard(model)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--logdir", type=Path, required=True)
    parser.add_argument("--layout", choices=["fsdp", "ddp"], default="fsdp")
    parser.add_argument("--fail-take", default="", help="RANK:STEP, see inject_take_failure")
    parser.add_argument("--fail", default="", help="METHOD:RANK:STEP, see inject_failure")
    args = parser.parse_args()
    faulthandler.dump_traceback_later(90, exit=True)
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    current = [0]
    if args.fail_take:
        inject_take_failure(args.fail_take, current)
    if args.fail:
        inject_failure(args.fail, current)
    # lrwatch's own copies, at a shorter cadence (the monitor builds them with Snapshots()).
    monitor.Snapshots = functools.partial(Snapshots, every=EVERY)  # type: ignore[misc]
    said = Said()
    logging.getLogger("lrwatch").addHandler(said)
    model = wrap(build(), args.layout)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    crit = nn.MSELoss()
    seen: dict[str, list[float]] = {"lr": [], "grad_norm": [], "mon_step": []}

    def stepped_with(optimizer: Any, a: Any, k: Any) -> None:  # before lrwatch's post-hook
        seen["lr"].append(optimizer.param_groups[0]["lr"])
        total = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf)
        seen["grad_norm"].append(float(full(total)))

    opt.register_step_post_hook(stepped_with)
    before: dict[int, Any] = {}
    after: dict[int, Any] = {}
    step = 0
    with lrwatch.watch(
        model, opt, logdir=args.logdir, criterion=crit, log_every=5, control_every=5
    ) as mon:
        for step in range(1, STEPS + 1):
            current[0] = step
            x, y = batch(rank, step)
            crit(model(x), y).backward()
            if step in RECORDED:
                before[step] = state_of(model, opt)
            opt.step()
            opt.zero_grad()
            seen["mon_step"].append(mon.step)
            if step in READ_AT:
                after[step] = state_of(model, opt)
            if rank == 0 and step in ACTIONS:
                append_action(args.logdir, source="daemon", **ACTIONS[step])  # type: ignore[arg-type]
            if mon.should_stop:
                break
    result = {"before": before, "after": after, **seen, "last_step": step, "said": said.lines}
    result["param_bytes"] = param_bytes(opt)  # what rollback="auto" decides by
    torch.save(result, args.logdir.parent / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
    faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
    main()
