"""One rank of the sharded-training tests (tests/test_sharded.py runs it under torchrun, gloo).

Every rank trains a 3-layer MLP sharded with FSDP2 (``fully_shard`` per layer and at the root)
under lrwatch. Rank 0 then trains an unsharded copy of the same model on the same global batches
in this one process and writes, per step, what the event file must hold: the reference values of
that unsharded run, and torch's own DTensor-aware ``clip_grad_norm_`` total of the sharded run.

A hang anywhere (a collective one rank never joins) dumps every thread's stack and exits, so the
test fails with the stacks instead of waiting for its own timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import faulthandler
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import lrwatch
from lrwatch import schema

BATCH = 4  # per rank


def build() -> nn.Sequential:
    torch.manual_seed(0)
    layers = [nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)]
    return nn.Sequential(*layers)


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(BATCH, 6, generator=gen), torch.randn(BATCH, 4, generator=gen)


def shard(model: nn.Sequential, layout: str = "fsdp") -> nn.Sequential:
    """FSDP2 per layer and root; HSDP on a (replicate 2, shard 2) mesh; or tensor parallel."""
    if layout == "tp":
        from torch.distributed.tensor import Replicate
        from torch.distributed.tensor.parallel import (
            ColwiseParallel,
            RowwiseParallel,
            parallelize_module,
        )

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        last = ColwiseParallel(output_layouts=Replicate())
        plan = {"0": ColwiseParallel(), "2": RowwiseParallel(), "4": last}
        return parallelize_module(model, mesh, plan)  # type: ignore[arg-type,return-value]
    mesh = None
    if layout == "hsdp":
        world = dist.get_world_size()
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def data_rank(layout: str, rank: int) -> int:
    """Whose batch a rank trains on: its own, except under tensor parallel (one shared batch)."""
    return 0 if layout == "tp" else rank


@contextlib.contextmanager
def counting_all_reduce() -> Iterator[list[int]]:
    """Count ``dist.all_reduce`` calls within the block (a spy: the real collective runs)."""
    real = dist.all_reduce
    calls = [0]

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real(*args, **kwargs)

    dist.all_reduce = spy
    try:
        yield calls
    finally:
        dist.all_reduce = real


def inject_failure(spec: str, current: list[int]) -> None:
    """``METHOD:RANK:STEP``: ``Measurer.METHOD`` raises on that rank at that step (test only)."""
    from lrwatch.hook.measure import Measurer

    method, rank, step = spec.split(":")
    if dist.get_rank() != int(rank):
        return
    real = getattr(Measurer, method)

    def failing(self: Any, *args: Any, **kwargs: Any) -> Any:
        if current[0] == int(step):
            raise RuntimeError(f"injected failure in {method} at step {step}")
        return real(self, *args, **kwargs)

    setattr(Measurer, method, failing)


def train_sharded(args: argparse.Namespace, model: nn.Module, world: int) -> dict[int, float]:
    """The run under test; returns torch's own total grad norm per step (a DTensor collective)."""
    rank = dist.get_rank()
    current = [0]  # the step being trained, for an injected failure
    if args.fail:
        inject_failure(args.fail, current)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    crit = nn.MSELoss()
    totals: dict[int, float] = {}
    all_reduces: list[int] = []
    every: Any = "auto" if args.log_every == 0 else args.log_every
    with lrwatch.watch(model, opt, logdir=args.logdir, criterion=crit, log_every=every) as mon:
        for step in range(1, args.steps + 1):
            current[0] = step
            x, y = batch(data_rank(args.layout, rank), step)
            crit(model(x), y).backward()
            total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=math.inf)
            totals[step] = float(total.full_tensor())  # type: ignore[attr-defined]
            with counting_all_reduce() as calls:  # lrwatch's hooks run inside step()
                opt.step()
            all_reduces.append(calls[0])
            opt.zero_grad()
            if mon.should_stop:
                break
        cadence = mon.log_every
    log = {"steps": step, "log_every": cadence, "all_reduces": all_reduces}
    (args.logdir.parent / f"rank{rank}.json").write_text(json.dumps(log))
    return totals


def train_reference(args: argparse.Namespace, model: nn.Module, world: int) -> dict[str, Any]:
    """The same model unsharded, one process, the global batch: what every tag must equal."""
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    crit = nn.MSELoss()
    names = [n for n, _ in model.named_parameters()]
    out: dict[str, dict[int, float]] = {}

    def put(tag: str, step: int, value: torch.Tensor) -> None:
        out.setdefault(tag, {})[step] = float(value)

    for step in range(1, args.steps + 1):
        parts = [batch(r, step) for r in sorted({data_rank(args.layout, r) for r in range(world)})]
        x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        crit(model(x), y).backward()
        params = list(model.parameters())
        put(schema.GRAD_NORM, step, torch.nn.utils.clip_grad_norm_(params, math.inf))
        for name, p in zip(names, params, strict=True):
            assert p.grad is not None
            put(schema.per_tensor_tag("grad_norm", name), step, p.grad.norm())
        before = [p.detach().clone() for p in params]
        opt.step()
        opt.zero_grad()
        deltas = [(p.detach() - b).norm() for p, b in zip(params, before, strict=True)]
        w_before = [b.norm() for b in before]
        w_after = [p.detach().norm() for p in params]
        put(schema.UPDATE_RATIO, step, torch.stack(deltas).norm() / torch.stack(w_before).norm())
        put(schema.WEIGHT_NORM, step, torch.stack(w_after).norm())
        for i, name in enumerate(names):
            put(schema.per_tensor_tag("update_ratio", name), step, deltas[i] / w_before[i])
            put(schema.per_tensor_tag("weight_norm", name), step, w_after[i])
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--logdir", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--log-every", type=int, default=1, help="0: auto")
    parser.add_argument("--hang-after", type=float, default=120.0)
    parser.add_argument("--layout", choices=["fsdp", "hsdp", "tp"], default="fsdp")
    parser.add_argument("--fail", default="", help="METHOD:RANK:STEP, see inject_failure")
    args = parser.parse_args()
    faulthandler.dump_traceback_later(args.hang_after, exit=True)
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    world = dist.get_world_size()
    model = build()
    reference = copy.deepcopy(model)
    totals = train_sharded(args, shard(model, args.layout), world)
    if dist.get_rank() == 0:
        expected = train_reference(args, reference, world)
        expected["fsdp_clip_grad_norm"] = totals
        (args.logdir.parent / "expected.json").write_text(json.dumps(expected))
    dist.barrier()
    dist.destroy_process_group()
    faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
    main()
