"""The hook against independent computations, read back with TensorBoard's EventAccumulator."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import lrwatch
from lrwatch import schema
from lrwatch.control import append_action
from lrwatch.hook import stats
from lrwatch.hook.monitor import StopTraining
from lrwatch.schema import ActionKind


def read_scalars(path: Path) -> dict[str, dict[int, float]]:
    """Every scalar of one event file (or the lrwatch file of a directory), tag -> step -> value."""
    if path.is_dir():
        (path,) = path.glob("*.lrwatch")
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: {e.step: e.value for e in acc.Scalars(t)} for t in acc.Tags()["scalars"]}


def small_model() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def batch(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 6), torch.randint(0, 3, (n,))


class Oracle:
    """What the recorded values must be, computed the obvious way around each real step."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.optimizer = optimizer
        self.steps: dict[int, dict[str, float]] = {}

    def params(self) -> list[nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]

    def before(self, step: int) -> None:
        ps = self.params()
        exp: dict[str, float] = {}
        total = torch.nn.utils.clip_grad_norm_(ps, max_norm=math.inf)
        exp[schema.GRAD_NORM] = float(total)
        for p in ps:
            assert p.grad is not None
            exp[schema.per_tensor_tag("grad_norm", self.names[id(p)])] = float(
                torch.linalg.vector_norm(p.grad)
            )
        self._copies = [p.detach().clone() for p in ps]
        self._step, self._exp = step, exp

    def after(self) -> None:
        ps = self.params()
        exp = self._exp
        diffs = [p.detach() - c for p, c in zip(ps, self._copies, strict=True)]
        before = torch.cat([c.reshape(-1) for c in self._copies])
        after = torch.cat([p.detach().reshape(-1) for p in ps])
        diff = torch.cat([d.reshape(-1) for d in diffs])
        exp[schema.UPDATE_RATIO] = float(diff.norm() / before.norm())
        exp[schema.WEIGHT_NORM] = float(after.norm())
        for p, c, d in zip(ps, self._copies, diffs, strict=True):
            name = self.names[id(p)]
            exp[schema.per_tensor_tag("weight_norm", name)] = float(p.detach().norm())
            exp[schema.per_tensor_tag("update_ratio", name)] = float(d.norm() / c.norm())
        self.steps[self._step] = exp


def assert_matches(got: dict[str, dict[int, float]], oracle: Oracle, steps: list[int]) -> None:
    for step in steps:
        for tag, value in oracle.steps[step].items():
            assert got[tag][step] == pytest.approx(value, rel=1e-4, abs=1e-7), (tag, step)
    for tag in oracle.steps[steps[0]]:
        if tag != schema.GRAD_NORM:  # the global grad norm is every step's
            assert sorted(got[tag]) == steps, tag
    every = {s: oracle.steps[s][schema.GRAD_NORM] for s in oracle.steps}
    assert got[schema.GRAD_NORM] == pytest.approx(every, rel=1e-5)


OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
}


@pytest.mark.parametrize("make_opt", list(OPTIMIZERS.values()), ids=list(OPTIMIZERS))
def test_monitor_records_norms_equal_to_independent_computation(
    tmp_path: Path, make_opt: Callable[[Any], torch.optim.Optimizer]
) -> None:
    model = small_model()
    model[2].weight.requires_grad_(False)  # frozen: grad stays None
    groups = [
        {"params": [model[0].weight, model[0].bias, model[2].weight]},
        {"params": [model[2].bias, model[4].weight, model[4].bias], "lr": 3e-3},
    ]
    opt = make_opt(groups)
    crit = nn.CrossEntropyLoss()
    oracle, losses = Oracle(model, opt), {}
    with lrwatch.watch(model, opt, logdir=tmp_path, criterion=crit, log_every=2) as mon:
        for step in range(1, 8):
            x, y = batch()
            loss = crit(model(x), y)
            loss.backward()
            losses[step] = loss.item()
            oracle.before(step)
            opt.step()
            oracle.after()
            opt.zero_grad()
            assert mon.step == step
    got = read_scalars(tmp_path)
    assert_matches(got, oracle, [1, 2, 4, 6])
    assert got[schema.LOSS] == pytest.approx(losses)
    assert got[schema.NONFINITE] == {s: 0.0 for s in range(1, 8)}
    assert got[schema.LR] == {s: pytest.approx(opt.param_groups[0]["lr"]) for s in range(1, 8)}
    assert got[schema.lr_group_tag(1)] == {s: pytest.approx(3e-3) for s in range(1, 8)}
    frozen = schema.per_tensor_tag("grad_norm", "2.weight")
    assert frozen not in got


def test_monitor_reuses_its_weight_snapshot_across_sparse_logging_steps(tmp_path: Path) -> None:
    """At a sparse cadence a small model's snapshot is kept between logging steps and refilled
    (bench/hook_overhead.py: a fresh copy page-faults). The weights move in between, and a
    tensor stops and starts having gradients, which changes the snapshot's shape: every logged
    update ratio and weight norm must still be the oracle's."""
    model, crit = small_model(), nn.CrossEntropyLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    oracle = Oracle(model, opt)
    with lrwatch.watch(model, opt, logdir=tmp_path, criterion=crit, log_every=5) as mon:
        for step in range(1, 27):
            model[2].weight.requires_grad_(not 9 <= step <= 16)  # no grad at logging steps 10, 15
            x, y = batch()
            crit(model(x), y).backward()
            oracle.before(step)
            opt.step()
            oracle.after()
            opt.zero_grad()
        kept = mon._steps.measure.buffers if mon._steps is not None else None
    assert kept is not None  # kept between logging steps: the reuse was exercised
    got = read_scalars(tmp_path)
    logged = [1, 5, 10, 15, 20, 25]
    for step in logged:
        for tag, value in oracle.steps[step].items():
            assert got[tag][step] == pytest.approx(value, rel=1e-4, abs=1e-7), (tag, step)
    frozen = schema.per_tensor_tag("update_ratio", "2.weight")
    assert sorted(got[frozen]) == [1, 5, 20, 25]
    assert sorted(got[schema.UPDATE_RATIO]) == logged


def test_monitor_averages_loss_over_gradient_accumulation(tmp_path: Path) -> None:
    model, crit = small_model(), nn.MSELoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    expected = {}
    oracle = Oracle(model, opt)
    with lrwatch.watch(model, opt, logdir=tmp_path, criterion=crit, log_every=1):
        for step in range(1, 4):
            micro = []
            for _ in range(3):
                x = torch.randn(4, 6)
                loss = crit(model(x), torch.zeros(4, 3))
                (loss / 3).backward()
                micro.append(loss.item())
            with torch.no_grad():  # an evaluation forward must not count
                crit(model(torch.randn(4, 6)), torch.ones(4, 3))
            expected[step] = sum(micro) / 3
            oracle.before(step)
            opt.step()
            oracle.after()
            opt.zero_grad()
    got = read_scalars(tmp_path)
    assert got[schema.LOSS] == pytest.approx(expected)
    assert_matches(got, oracle, [1, 2, 3])


def test_monitor_measures_the_grads_of_a_closure_step(tmp_path: Path) -> None:
    model, crit = small_model(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    oracle, losses = Oracle(model, opt), {}

    def make_closure(mon: lrwatch.Monitor) -> Callable[[], torch.Tensor]:
        x, y = batch()
        copies = [p.detach().clone() for p in model.parameters()]

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = crit(model(x), y)
            loss.backward()
            losses[mon.step] = loss.item()
            # the oracle sees exactly the grads the optimizer steps with
            oracle.before(mon.step)
            oracle._copies = [c.clone() for c in copies]
            return loss

        return closure

    with lrwatch.watch(model, opt, logdir=tmp_path, criterion=crit, log_every=1) as mon:
        for _ in range(3):
            closure = make_closure(mon)
            opt.step(closure)
            oracle.after()
    got = read_scalars(tmp_path)
    assert got[schema.LOSS] == pytest.approx(losses)
    assert_matches(got, oracle, [1, 2, 3])


@pytest.mark.parametrize("how", ["positional", "keyword"])
def test_monitor_clips_the_grads_a_closure_computes(tmp_path: Path, how: str) -> None:
    """A clip action with ``optimizer.step(closure)`` acts on the closure's gradients.

    The reference clips by hand with ``clip_grad_norm_`` between backward and step; the
    watched copy must step with exactly the same clipped gradients.
    """
    model, crit = small_model(), nn.CrossEntropyLoss()
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    append_action(tmp_path, action=ActionKind.CLIP, max_norm=0.05)
    preclip = {}
    with lrwatch.watch(
        model, opt, logdir=tmp_path, criterion=crit, log_every=1, control_every=1
    ) as mon:
        for step in range(1, 5):
            x, y = batch()

            def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                opt.zero_grad()
                loss = crit(model(x), y)
                loss.backward()
                return loss

            if how == "positional":
                opt.step(closure)
            else:
                opt.step(closure=closure)
            ref_opt.zero_grad()
            crit(reference(x), y).backward()
            preclip[step] = float(torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05))
            ref_opt.step()
            for p, q in zip(model.parameters(), reference.parameters(), strict=True):
                torch.testing.assert_close(p, q)
    assert mon.step == 4
    got = read_scalars(tmp_path)
    assert got[schema.GRAD_NORM_PRECLIP] == pytest.approx(preclip, rel=1e-4)
    assert got[schema.GRAD_NORM] == pytest.approx(preclip, rel=1e-4)  # before any clip


def test_monitor_clips_after_every_closure_call_of_lbfgs(tmp_path: Path) -> None:
    """LBFGS calls its closure several times per step: each call's gradients are clipped."""
    model, crit = small_model(), nn.CrossEntropyLoss()
    reference = copy.deepcopy(model)
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
    ref_opt = torch.optim.LBFGS(reference.parameters(), lr=0.5, max_iter=4)
    append_action(tmp_path, action=ActionKind.CLIP, max_norm=0.05)
    x, y = batch()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = crit(model(x), y)
        loss.backward()
        return loss

    def clipped_by_hand() -> torch.Tensor:
        ref_opt.zero_grad()
        loss = crit(reference(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
        return loss

    with lrwatch.watch(model, opt, logdir=tmp_path, log_every=1, control_every=1):
        for _ in range(2):
            opt.step(closure)
            ref_opt.step(clipped_by_hand)
            for p, q in zip(model.parameters(), reference.parameters(), strict=True):
                torch.testing.assert_close(p, q)


def test_monitor_captures_hf_style_loss_and_explicit_log(tmp_path: Path) -> None:
    class HF(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            out = self.lin(x)
            return {"logits": out, "loss": out.pow(2).mean()}

    model = HF()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    expected = {}
    with lrwatch.watch(model, opt, logdir=tmp_path, log_every=5) as mon:
        for step in range(1, 4):
            loss = model(torch.randn(8, 6))["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad()
            expected[step] = loss.item()
            mon.log(**{"val/loss": torch.tensor(step * 1.5), "epoch": 0.5})
    got = read_scalars(tmp_path)
    assert got[schema.LOSS] == pytest.approx(expected)
    assert got["val/loss"] == pytest.approx({1: 1.5, 2: 3.0, 3: 4.5})
    assert got["epoch"] == {1: 0.5, 2: 0.5, 3: 0.5}


@pytest.mark.parametrize("when", ["before_step", "after_step"])
def test_monitor_log_loss_belongs_to_its_step_before_or_after(tmp_path: Path, when: str) -> None:
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    expected = {}
    with lrwatch.watch(model, opt, logdir=tmp_path, log_every=5) as mon:
        for step in range(1, 5):
            x, y = batch()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            expected[step] = loss.item()
            if when == "before_step":
                mon.log(loss=loss, mine=float(step))
            opt.step()
            opt.zero_grad()
            if when == "after_step":
                mon.log(loss=loss, mine=float(step))
    got = read_scalars(tmp_path)
    assert got[schema.LOSS] == pytest.approx(expected)
    assert got["mine"] == {s: float(s) for s in range(1, 5)}  # the same step as lrwatch's own
    assert set(got[schema.GRAD_NORM]) == set(got["mine"])


@pytest.mark.parametrize("mode", ["sentinel", "full"])
def test_monitor_flags_nonfinite_between_logging_steps(tmp_path: Path, mode: str) -> None:
    model, crit = small_model(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    poisoned = {3: model[0].bias, 6: model[2].weight}  # a bias at 3, a weight matrix at 6
    with lrwatch.watch(
        model, opt, logdir=tmp_path, criterion=crit, log_every=100, nonfinite=mode
    ) as mon:
        for step in range(1, 9):
            x, y = batch()
            # The NaN arises in backward, as a real one does (the norms are taken where it ends).
            hook = poisoned[step].register_hook(nan_first) if step in poisoned else None
            crit(model(x), y).backward()
            if hook is not None:
                hook.remove()
            opt.step()
            opt.zero_grad()
            if step in poisoned:  # repair, so later steps are finite again
                with torch.no_grad():
                    poisoned[step].nan_to_num_(0.0)
            assert mon.step == step
    flags = read_scalars(tmp_path)[schema.NONFINITE]
    # Every step checks every gradient (the global grad norm): a weight-only NaN too.
    assert {s for s, v in flags.items() if v} == {3, 6}


def nan_first(grad: torch.Tensor) -> torch.Tensor:
    grad = grad.clone()
    grad.view(-1)[0] = math.nan
    return grad


def test_monitor_flags_nonfinite_loss(tmp_path: Path) -> None:
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with lrwatch.watch(model, opt, logdir=tmp_path, log_every=100) as mon:
        for step in range(1, 5):
            loss = model(torch.randn(4, 6)).sum() * (math.inf if step == 2 else 1.0)
            mon.log(loss=loss.detach())
            loss.backward() if step != 2 else None
            opt.step()
            opt.zero_grad()
    got = read_scalars(tmp_path)
    assert got[schema.NONFINITE] == {1: 0.0, 2: 1.0, 3: 0.0, 4: 0.0}
    assert math.isinf(got[schema.LOSS][2])


def test_monitor_records_gradscaler_skips_as_skipped_not_nonfinite(tmp_path: Path) -> None:
    model, crit = small_model(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    skip_at = {3, 4, 7}
    scales, losses, real, unscaled = {}, {}, [], {}
    with lrwatch.watch(model, opt, logdir=tmp_path, criterion=crit, scaler=scaler, log_every=1):
        for it in range(1, 10):
            x, y = batch()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = crit(model(x), y)
            scaler.scale(loss).backward()
            if it in skip_at:
                g = model[4].bias.grad
                assert g is not None
                g[0] = math.inf
            scales[it] = scaler.get_scale()
            losses[it] = loss.item()
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            unscaled[it] = float(torch.nn.utils.get_total_norm(grads)) / scales[it]
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            if it not in skip_at:
                real.append(it)
    got = read_scalars(tmp_path)
    assert got[schema.SKIPPED] == {it: float(it in skip_at) for it in range(1, 10)}
    assert got[schema.NONFINITE] == {it: 0.0 for it in range(1, 10)}
    assert got[schema.LOSS_SCALE] == pytest.approx(scales)
    assert got[schema.LOSS] == pytest.approx(losses, rel=1e-2)
    assert got[schema.GRAD_NORM] == pytest.approx({it: unscaled[it] for it in real}, rel=1e-5)


def test_monitor_state_dict_round_trip_continues_the_step_count(tmp_path: Path) -> None:
    model, crit = small_model(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def train(mon: lrwatch.Monitor, n: int) -> None:
        for _ in range(n):
            x, y = batch()
            crit(model(x), y).backward()
            opt.step()
            opt.zero_grad()

    with lrwatch.watch(model, opt, logdir=tmp_path, criterion=crit, log_every=3) as mon:
        train(mon, 4)
        state = mon.state_dict()
    with lrwatch.watch(model, opt, logdir=tmp_path, criterion=crit, log_every=3) as resumed:
        resumed.load_state_dict(state)
        assert resumed.state_dict() == state
        train(resumed, 3)
        assert resumed.step == 7
    steps: set[int] = set()
    for f in tmp_path.glob("*.lrwatch"):
        steps |= set(read_scalars(f)[schema.LOSS])
    assert steps == set(range(1, 8))


def test_monitor_writes_into_a_summarywriter_run(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    sw = SummaryWriter(log_dir=str(tmp_path / "run"))
    model = small_model()
    opt = torch.optim.Adam(model.parameters())
    crit = nn.CrossEntropyLoss()
    with lrwatch.watch(model, opt, writer=sw, criterion=crit, log_every=1) as mon:
        assert mon.run_dir == tmp_path / "run"
        x, y = batch()
        loss = crit(model(x), y)
        loss.backward()
        opt.step()
        sw.add_scalar("mine", 1.0, 1)
    sw.close()
    assert read_scalars(tmp_path / "run")[schema.LOSS] == pytest.approx({1: loss.item()})
    assert len(list((tmp_path / "run").iterdir())) == 2  # the user's file and lrwatch's


def test_monitor_close_detaches_every_hook(tmp_path: Path) -> None:
    model, crit = small_model(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = lrwatch.watch(model, opt, logdir=tmp_path, criterion=crit)
    mon.close()
    mon.close()  # idempotent
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert not model._forward_hooks and not crit._forward_hooks
    x, y = batch()
    crit(model(x), y).backward()
    opt.step()
    assert mon.step == 0


def test_monitor_applies_control_actions_and_acknowledges_them(tmp_path: Path) -> None:
    model, crit = small_model(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = lrwatch.watch(
        model,
        opt,
        logdir=tmp_path,
        criterion=crit,
        log_every=1,
        control_every=1,
        raise_on_stop=True,
    )
    lrs, norms = {}, {}
    with pytest.raises(StopTraining), mon:
        for step in range(1, 10):
            if step == 3:
                append_action(tmp_path, action=ActionKind.LR_CUT, factor=2)
            if step == 5:
                append_action(tmp_path, action=ActionKind.CLIP, max_norm=0.01)
            if step == 7:
                append_action(tmp_path, action=ActionKind.STOP)
            x, y = batch()
            crit(model(x), y).backward()
            norms[step] = float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))
            lrs[step] = 0.1 / (2 if step >= 3 else 1)
            opt.step()
            opt.zero_grad()
    assert mon.step == 7 and mon.should_stop
    assert opt.param_groups[0]["lr"] == 0.1  # the scheduler's value is back
    got = read_scalars(tmp_path)
    assert got[schema.CONTROL_ACK] == {3: 1.0, 5: 2.0, 7: 3.0}
    assert got[schema.LR_FACTOR] == {3: 2.0, 5: 2.0, 7: 2.0}
    assert got[schema.CLIP_MAX_NORM] == pytest.approx({3: 0.0, 5: 0.01, 7: 0.01})
    assert got[schema.STOP] == {3: 0.0, 5: 0.0, 7: 1.0}
    assert got[schema.LR] == pytest.approx(lrs)
    assert got[schema.GRAD_NORM_PRECLIP] == pytest.approx({5: norms[5], 6: norms[6], 7: norms[7]})
    assert got[schema.GRAD_NORM] == pytest.approx(norms)  # before the clip, every step


def test_monitor_survives_an_unwritable_logdir(tmp_path: Path, caplog: Any) -> None:
    (tmp_path / "file").write_text("not a directory")
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with (
        caplog.at_level(logging.WARNING),
        lrwatch.watch(model, opt, logdir=tmp_path / "file" / "run", log_every=1) as mon,
    ):
        for _ in range(3):
            model(torch.randn(2, 6)).sum().backward()
            opt.step()
    assert mon.step == 3
    assert any("lrwatch" in r.getMessage() for r in caplog.records)


def test_monitor_survives_a_dead_writer_and_failing_stats(
    tmp_path: Path, caplog: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = lrwatch.watch(model, opt, logdir=tmp_path, log_every=1)
    mon._recorder.writer.close()  # type: ignore[union-attr]  # the writer is gone under it

    def broken(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("boom")

    monkeypatch.setattr(stats, "foreach_norms", broken)
    with caplog.at_level(logging.WARNING), mon:
        for _ in range(6):
            model(torch.randn(2, 6)).sum().backward()
            opt.step()
            mon.log(loss="not a number")  # type: ignore[arg-type]
    assert mon.step == 6
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert 1 <= len(warnings) <= 4  # once per kind, not once per step


def test_watch_refuses_bad_settings(tmp_path: Path) -> None:
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for bad in ({"log_every": 0}, {"budget": 2.0}, {"nonfinite": "some"}):
        with pytest.raises(lrwatch.errors.ConfigError):
            lrwatch.watch(model, opt, logdir=tmp_path, **bad)


def test_nice_cadences_are_readable_and_capped() -> None:
    from lrwatch.hook.cadence import MAX_EVERY, nice

    assert [nice(x) for x in (0.3, 1, 1.5, 3, 7, 11, 40, 51)] == [1, 1, 2, 5, 10, 20, 50, 100]
    assert nice(1e9) == MAX_EVERY


def test_auto_cadence_logs_the_first_50_steps_then_at_least_every_20(tmp_path: Path) -> None:
    """A ~0.1 ms step leaves no room in the 1% budget: "auto" still logs the update ratio at
    least every AUTO_MAX_EVERY steps, so the ratio detectors see the whole run, not its start."""
    from lrwatch.hook.cadence import AUTO_MAX_EVERY

    model, crit = small_model(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with lrwatch.watch(model, opt, logdir=tmp_path, criterion=crit) as mon:
        for _ in range(170):
            x, y = batch()
            crit(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    got = read_scalars(tmp_path)
    logged = sorted(got[schema.UPDATE_RATIO])
    assert logged[:50] == list(range(1, 51))  # the ratio detector's window, filled at once
    assert mon.log_every in {1, 2, 5, 10, 20} and AUTO_MAX_EVERY == 20
    gaps = [b - a for a, b in zip(logged[49:], logged[50:], strict=False)]
    assert gaps and max(gaps) <= AUTO_MAX_EVERY  # then the budget's cadence, capped
    assert logged[-1] > 170 - AUTO_MAX_EVERY
    assert set(got[schema.LOSS]) == set(got[schema.GRAD_NORM]) == set(range(1, 171))
