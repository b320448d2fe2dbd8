"""Worker for test_lightning's FSDP2 test: ``torchrun --nproc_per_node 2 THIS OUT_DIR``.

Lightning's ``ModelParallelStrategy`` (its FSDP2 / DTensor strategy; ``FSDPStrategy`` refuses a
CPU accelerator) with the LRWatch callback, gloo on CPU: the MLP of tests/fsdp_worker.py
sharded with ``fully_shard`` per layer and at the root in ``configure_model``, each rank on its
own batches. Each rank records per step the LR its optimizer stepped with and torch's own
DTensor-aware ``clip_grad_norm_`` total; rank 0 writes a cut and a stop into the control file
mid-run, as the daemon would, then trains the unsharded reference of tests/fsdp_worker.py.
``faulthandler`` turns a collective one rank never joins into a failure with the stacks.
"""

from __future__ import annotations

import argparse
import copy
import faulthandler
import json
import math
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from fsdp_worker import batch, build, train_reference
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from lrwatch.control import append_action
from lrwatch.lightning import LRWatch
from lrwatch.schema import ActionKind

LR = 0.01
ACTIONS = {2: {"action": ActionKind.LR_CUT, "factor": 2}, 6: {"action": ActionKind.STOP}}


class Net(nn.Module):
    """The reference's container: parameter names as in the LightningModule (``net.*``)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]


class Sharded(pl.LightningModule):
    def __init__(self, net: nn.Module, run_dir: Path) -> None:
        super().__init__()
        self.net = net
        self.run_dir = run_dir
        self.seen: dict[str, list[float]] = {"lr": [], "grad_norm": []}

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]

    def training_step(self, data: Any, batch_idx: int) -> torch.Tensor:
        x, y = data
        return nn.functional.mse_loss(self(x), y)

    def on_train_batch_end(self, outputs: Any, data: Any, batch_idx: int) -> None:
        step = self.trainer.global_step
        if self.trainer.global_rank == 0 and step in ACTIONS:
            append_action(self.run_dir, source="daemon", **ACTIONS[step])  # type: ignore[arg-type]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        opt = torch.optim.AdamW(self.parameters(), lr=LR)
        opt.register_step_post_hook(self._record)  # before lrwatch's (attached at fit start)
        return opt

    def _record(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.seen["lr"].append(optimizer.param_groups[0]["lr"])
        total = torch.nn.utils.clip_grad_norm_(self.parameters(), math.inf)
        self.seen["grad_norm"].append(float(total.full_tensor()))  # type: ignore[attr-defined]


def batches(rank: int, steps: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for step in range(1, steps + 1):
        yield batch(rank, step)


class Batches(torch.utils.data.IterableDataset[tuple[torch.Tensor, torch.Tensor]]):
    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return batches(dist.get_rank(), self.steps)


def main(out: Path) -> None:
    faulthandler.dump_traceback_later(150, exit=True)
    warnings.simplefilter("ignore")  # Lightning's advice about workers and the like
    torch.set_num_threads(1)
    net = build()
    reference = Net(copy.deepcopy(net))
    run_dir = out / "run"
    module = Sharded(net, run_dir)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=12,
        logger=False,
        callbacks=[LRWatch(logdir=run_dir, log_every=1, control_every=5)],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        use_distributed_sampler=False,
    )
    trainer.fit(module, torch.utils.data.DataLoader(Batches(12), batch_size=None))
    rank = trainer.global_rank
    result = {**module.seen, "global_step": trainer.global_step}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    if rank == 0:  # the cut applies from step 5: the reference holds until then
        ref_args = argparse.Namespace(steps=4, lr=LR, layout="fsdp")
        expected = train_reference(ref_args, reference, trainer.world_size)
        (out / "expected.json").write_text(json.dumps(expected))
    faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
