"""Worker for test_control's DDP test: launched by ``torchrun --nproc_per_node 2``.

Rank 0 issues an LR cut mid-run (as the daemon would), then a rollback to step 5; every rank
records the LR its optimizer really stepped with, the step at which each action arrived, and
whether the rollback put back exactly its own weights of step 5 and skipped that step's update.
Rank 1 also records whether it ever looked at the control file (it must not: rank 0 reads and
broadcasts).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lrwatch.control import append_action
from lrwatch.hook.controller import Controller
from lrwatch.hook.snapshots import Snapshots
from lrwatch.schema import CONTROL_FILENAME, ActionKind


def main(run_dir: Path, out_dir: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    looked: list[str] = []
    real_lstat = os.lstat

    def spying_lstat(path: Any, *args: Any, **kwargs: Any) -> Any:
        if str(path).endswith(CONTROL_FILENAME):
            looked.append(str(path))
        return real_lstat(path, *args, **kwargs)

    os.lstat = spying_lstat  # type: ignore[assignment]
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = torch.optim.SGD([p], lr=0.1)
    ctl = Controller(run_dir, check_every=5, snapshots=Snapshots(every=5))
    grad = torch.tensor([1.0, 2.0, -3.0], dtype=torch.float64) * (1 + rank)  # ranks differ
    used, arrived, before = [], {}, {}
    rolled_back = False
    for step in range(20):
        p.grad = grad.clone()
        theta = before[step] = p.detach().clone()
        new = ctl.before_step(opt, step)
        opt.step()
        ctl.after_step(opt)
        used.append(float(((theta - p.detach()) / grad).mean()))
        if new:
            arrived[step] = [a.id for a in new]
        if step == 15:  # the rollback's step: step 5's own weights, no update on top
            rolled_back = torch.equal(p.detach(), before[5])
        if rank == 0 and step == 7:
            append_action(run_dir, action=ActionKind.LR_CUT, factor=2, source="daemon")
        if rank == 0 and step == 12:
            append_action(run_dir, action=ActionKind.ROLLBACK, to_step=5, source="daemon")
    result = {
        "used": used,
        "arrived": arrived,
        "looked": bool(looked),
        "factor": ctl.lr_factor,
        "rolled_back": rolled_back,
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
