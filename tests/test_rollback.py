"""Rollback: the hook restores its in-memory copy of the weights and optimizer state.

The oracle is a record the test keeps itself: a deep copy of the model and of the optimizer's
state at the start of every step, taken outside lrwatch. After a rollback the trained model must
equal the record of the step the hook says it restored (the newest kept copy at or before the
asked step), and the step that read the action must have changed nothing.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

import lrwatch
from lrwatch.control import append_action
from lrwatch.errors import ConfigError
from lrwatch.hook.snapshots import Snapshots
from lrwatch.schema import ActionKind


def model_and_data() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    return model, torch.randn(64, 6), torch.randint(0, 3, (64,))


def train(
    tmp_path: Path, steps: int, *, act_at: int | None, to_step: int, **watch: object
) -> tuple[nn.Module, dict[int, tuple[dict, dict]], lrwatch.Monitor]:
    """Adam at a high LR; the test's own record of (model, optimizer) state before each step."""
    model, x, y = model_and_data()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    record = {}
    crit = nn.CrossEntropyLoss()
    with lrwatch.watch(
        model, opt, logdir=tmp_path, criterion=crit, control_every=1, **watch
    ) as mon:
        for step in range(1, steps + 1):
            if step == act_at:
                append_action(tmp_path, action=ActionKind.ROLLBACK, to_step=to_step)
            crit(model(x), y).backward()
            record[step] = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
            opt.step()
            opt.zero_grad()
    return model, record, mon


def assert_state(model: nn.Module, want: dict) -> None:
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, want[name], rtol=0, atol=0)


def test_rollback_restores_the_newest_copy_at_or_before_the_step_and_skips_the_update(
    tmp_path: Path,
) -> None:
    # copies at step 1 (the first) and every 100: asked for 250 at step 260 -> step 200's
    model, record, mon = train(tmp_path, 261, act_at=260, to_step=250)
    assert mon.step == 261
    # step 260 applied no update: after it, the weights are step 200's; step 261 is one step
    # from there, so compare the state *before* step 261 with the record of step 200
    ref, _, _ = model_and_data()
    ref.load_state_dict(record[200][0])
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.05)
    ref_opt.load_state_dict(record[200][1])
    _, x, y = model_and_data()
    nn.CrossEntropyLoss()(ref(x), y).backward()
    ref_opt.step()
    assert_state(model, ref.state_dict())


def test_rollback_to_before_the_second_copy_goes_back_to_the_first(tmp_path: Path) -> None:
    model, record, _ = train(tmp_path, 150, act_at=150, to_step=50)
    assert_state(model, record[1][0])  # the action's own step (150) was the last: no update


def test_rollback_without_copies_changes_nothing_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="lrwatch"):
        model, record, _ = train(tmp_path / "off", 30, act_at=30, to_step=1, rollback=False)
    assert "keeps no copies" in caplog.text
    assert any(not torch.equal(p, record[1][0][n]) for n, p in model.state_dict().items())


def test_rollback_setting_is_checked(tmp_path: Path) -> None:
    model, _, _ = model_and_data()
    with pytest.raises(ConfigError, match="rollback"):
        lrwatch.watch(
            model, torch.optim.SGD(model.parameters(), lr=0.1), logdir=tmp_path, rollback="yes"
        )


def test_snapshots_keep_the_first_and_the_newest_two() -> None:
    model, _, _ = model_and_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    snaps = Snapshots(every=10, keep=2)
    for step in range(1, 41):
        if snaps.due(step):
            snaps.take(step, opt)
    assert [s.step for s in (snaps.first, *snaps.recent)] == [1, 30, 40]
    assert snaps.newest_at_or_before(29).step == 1
    assert snaps.newest_at_or_before(0) is None


def test_reused_copies_hold_the_state_of_their_own_step() -> None:
    """Copies recycle the oldest one's memory: each must still hold its own step's weights and
    Adam moments (against deep copies taken independently at the same steps)."""
    model, x, y = model_and_data()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    snaps = Snapshots(every=10, keep=2)
    record: dict[int, tuple[dict, dict]] = {}
    for step in range(1, 61):
        if snaps.due(step):
            snaps.take(step, opt)
            record[step] = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for at, want_step in ((55, 50), (45, 1)):  # the second rollback goes past the dropped 60
        assert snaps.restore(at, opt) == want_step
        assert_state(model, record[want_step][0])
        want = record[want_step][1]["state"]
        got = opt.state_dict()["state"]
        for i, moments in want.items():
            for key in ("exp_avg", "exp_avg_sq", "step"):
                torch.testing.assert_close(got[i][key], moments[key])


def test_a_restore_writes_into_the_optimizers_own_state_tensors() -> None:
    """No allocation in a restore: it cannot run out of memory on one rank only, after the
    other ranks restored (the values are checked by the test above)."""
    model, x, y = model_and_data()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    snaps = Snapshots(every=2, keep=2)
    for step in range(1, 6):
        if snaps.due(step):
            snaps.take(step, opt)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    held = [t for st in opt.state.values() for t in st.values()]
    assert snaps.restore(4, opt) == 4
    after = [t for st in opt.state.values() for t in st.values()]
    assert len(after) == len(held) and all(a is b for a, b in zip(after, held, strict=True))


def test_reused_copies_of_dtensor_shards_hold_the_state_of_their_own_step(tmp_path: Path) -> None:
    """FSDP2's parameters are DTensors, for which torch has no ``_foreach_copy_`` rule: the
    reused copies must still be refilled (one-rank gloo group; tests/test_rollback_distributed.py
    runs two ranks under torchrun)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        mesh = init_device_mesh("cpu", (1,))
        param = nn.Parameter(distribute_tensor(torch.randn(4, 3), mesh, [Shard(0)]))
        opt = torch.optim.Adam([param], lr=0.1)
        snaps = Snapshots(every=10, keep=2)
        record = {}
        for step in range(1, 41):
            if snaps.due(step):
                snaps.take(step, opt)
                record[step] = param.full_tensor().clone()
            param.grad = distribute_tensor(torch.randn(4, 3), mesh, [Shard(0)])
            opt.step()
        assert [s.step for s in (snaps.first, *snaps.recent)] == [1, 30, 40]
        assert snaps.restore(35, opt) == 30
        torch.testing.assert_close(param.full_tensor(), record[30], rtol=0, atol=0)
    finally:
        dist.destroy_process_group()
