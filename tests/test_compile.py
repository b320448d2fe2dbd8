"""torch.compile: a compiled model and a compiled optimizer step, watched, match eager exactly.

Graph breaks are counted by dynamo itself (``torch._dynamo.utils.counters``): the hook must add
none to the model's forward, whether the monitor is given the compiled module or the module
inside it, and none to a compiled ``optimizer.step``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch._dynamo.utils import counters

import lrwatch
from lrwatch import schema


def scalars(path: Path) -> dict[str, dict[int, float]]:
    (path,) = path.glob("*.lrwatch")
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: {e.step: e.value for e in acc.Scalars(t)} for t in acc.Tags()["scalars"]}


def train(logdir: Path | None, *, compiled: bool, watch: str = "wrapper") -> int:
    """Six AdamW steps with the user's own clip; the number of graph breaks dynamo counted."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    run: Any = torch.compile(model) if compiled else model
    step: Any = torch.compile(opt.step) if compiled else opt.step
    torch._dynamo.reset()
    counters.clear()
    target = run if watch == "wrapper" else model
    mon = lrwatch.watch(target, opt, logdir=logdir, log_every=2) if logdir else None
    gen = torch.Generator().manual_seed(1)
    for _ in range(6):
        x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 4, generator=gen)
        nn.functional.mse_loss(run(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        step()
        opt.zero_grad()
    if mon is not None:
        mon.close()
    return sum(counters["graph_break"].values())


@pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.*")  # inductor's own imports
@pytest.mark.parametrize("watch", ["wrapper", "inner"])
def test_compiled_model_and_step_add_no_graph_break_and_match_eager(
    tmp_path: Path, watch: str
) -> None:
    bare_breaks = train(None, compiled=True)
    breaks = train(tmp_path / "compiled", compiled=True, watch=watch)
    assert breaks <= bare_breaks
    train(tmp_path / "eager", compiled=False)
    want, got = scalars(tmp_path / "eager"), scalars(tmp_path / "compiled")
    assert set(got) == set(want)
    assert len(got[schema.GRAD_NORM]) == 6 and len(got[schema.UPDATE_RATIO]) == 4
    for tag, values in want.items():
        assert got[tag] == pytest.approx(values, rel=1e-4, abs=1e-6), tag
    # The user clips at 0.5: the recorded norms are the ones before, as in eager.
    assert max(got[schema.GRAD_NORM].values()) > 0.5
