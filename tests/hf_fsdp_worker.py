"""Worker for test_hf's FSDP test: ``torchrun --nproc_per_node 2 THIS OUT_DIR``.

A Hugging Face Trainer asked for FSDP2 (``fsdp=True``, ``fsdp_config={"fsdp_version": 2}``) on
CPU with gloo, with the LRWatch callback. Accelerate (1.16) turns FSDP on only for accelerator
devices: on CPU it drops the plugin without a warning and the Trainer wraps the model in DDP,
which each rank records (``wrapped``) for the test to pin. Each rank also records the Trainer's
own logged ``grad_norm`` (the pre-clip total of its ``clip_grad_norm_``) and the step its
training stopped at; rank 0 writes a stop into the control file after step 3.
``faulthandler`` turns a collective one rank never joins into a failure with the stacks.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from lrwatch.control import append_action
from lrwatch.hf import LRWatchCallback
from lrwatch.schema import ActionKind


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.l2(torch.relu(self.l1(x)))
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


class Points(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(256, 8, generator=g)
        self.y = (self.x[:, 0] > 0).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


class Record(TrainerCallback):
    def __init__(self, watcher: LRWatchCallback) -> None:
        self.watcher = watcher
        self.grad_norm: dict[int, float] = {}

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        if logs and "grad_norm" in logs:
            self.grad_norm[state.global_step] = float(logs["grad_norm"])

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero and state.global_step == 3:
            assert self.watcher.monitor is not None
            append_action(self.watcher.monitor.run_dir, action=ActionKind.STOP, reason="test")


def main(out: Path) -> None:
    faulthandler.dump_traceback_later(150, exit=True)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    args = TrainingArguments(
        output_dir=str(out / "out"),
        use_cpu=True,
        ddp_backend="gloo",
        fsdp=True,
        fsdp_config={"fsdp_version": 2, "reshard_after_forward": True},
        max_steps=20,
        per_device_train_batch_size=4,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
    )
    watcher = LRWatchCallback(logdir=out / "run", log_every=1, control_every=5)
    record = Record(watcher)
    trainer = Trainer(model=Mlp(), args=args, train_dataset=Points(), callbacks=[watcher, record])
    trainer.train()
    result = {
        "wrapped": type(trainer.model_wrapped).__name__,
        "global_step": trainer.state.global_step,
        "grad_norm": record.grad_norm,
    }
    (out / f"rank{os.environ['RANK']}.json").write_text(json.dumps(result))
    faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
