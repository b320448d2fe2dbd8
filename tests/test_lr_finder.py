"""The LR range test on a real MLP and real data (digits), with independent oracles."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import lrwatch
from lrwatch.errors import ConfigError
from lrwatch.lr_finder.finder import LRFinderResult
from lrwatch.lr_finder.suggest import RULES

Batches = list[tuple[torch.Tensor, torch.Tensor]]
OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, weight_decay=1e-4),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3),
}


@pytest.fixture(scope="module")
def digits() -> Batches:
    data = load_digits()
    x = torch.tensor(data.data[:640], dtype=torch.float32) / 16.0
    y = torch.tensor(data.target[:640], dtype=torch.long)
    return [(x[i : i + 32], y[i : i + 32]) for i in range(0, len(x), 32)]


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 10)
    )


def train_a_little(model: nn.Module, opt: torch.optim.Optimizer, batches: Batches) -> None:
    """A few real steps first, so the optimizer has momentum / moment buffers to lose."""
    for x, y in batches[:3]:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()  # type: ignore[no-untyped-call]
        opt.step()


def assert_same_state(before: Any, after: Any) -> None:
    """Exact equality through nested state dicts (tensors bit for bit)."""
    if isinstance(before, torch.Tensor):
        assert torch.equal(before, after)
    elif isinstance(before, dict):
        assert before.keys() == after.keys()
        for key in before:
            assert_same_state(before[key], after[key])
    elif isinstance(before, list | tuple):
        assert len(before) == len(after)
        for a, b in zip(before, after, strict=True):
            assert_same_state(a, b)
    else:
        assert before == after


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_find_lr_restores_weights_buffers_and_lr(digits: Batches, name: str) -> None:
    model = make_model()
    opt = OPTIMIZERS[name](model.parameters())
    train_a_little(model, opt, digits)
    model.eval()
    model_before = copy.deepcopy(model.state_dict())
    opt_before = copy.deepcopy(opt.state_dict())
    grads_before = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    result = lrwatch.find_lr(model, opt, digits, nn.CrossEntropyLoss(), num_steps=40)
    assert len(result.lrs) > 10  # the sweep really stepped the model
    assert_same_state(model_before, model.state_dict())
    assert_same_state(opt_before, opt.state_dict())
    assert_same_state(grads_before, [p.grad for p in model.parameters()])
    assert not any(m.training for m in model.modules())


def test_find_lr_restores_state_when_the_criterion_raises(digits: Batches) -> None:
    model = make_model()
    opt = OPTIMIZERS["sgd"](model.parameters())
    train_a_little(model, opt, digits)
    model_before, opt_before = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    calls = 0

    def flaky(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 6:
            raise RuntimeError("out of memory, say")
        return nn.functional.cross_entropy(out, target)

    with pytest.raises(RuntimeError, match="out of memory"):
        lrwatch.find_lr(model, opt, digits, flaky, start_lr=1e-3, end_lr=1.0)
    assert_same_state(model_before, model.state_dict())
    assert_same_state(opt_before, opt.state_dict())


def test_sweep_lrs_are_exactly_geometric_and_really_applied(digits: Batches) -> None:
    model = make_model()
    opt = OPTIMIZERS["sgd"](model.parameters())
    applied: list[float] = []
    opt.register_step_pre_hook(lambda o, a, k: applied.append(o.param_groups[0]["lr"]))
    result = lrwatch.find_lr(
        model, opt, digits, nn.CrossEntropyLoss(), start_lr=1e-5, end_lr=1e-1, num_steps=30
    )
    assert result.stop_reason == "completed"
    expected = [10 ** (-5 + 4 * i / 29) for i in range(30)]
    assert result.lrs[0] == 1e-5 and math.isclose(result.lrs[-1], 1e-1, rel_tol=1e-12)
    for got, want in zip(result.lrs, expected, strict=True):
        assert math.isclose(got, want, rel_tol=1e-12)
    assert applied == list(result.lrs)
    ratios = [b / a for a, b in zip(result.lrs, result.lrs[1:], strict=False)]
    assert max(ratios) - min(ratios) < 1e-12


def test_find_lr_stops_early_when_the_loss_diverges(digits: Batches) -> None:
    model = make_model()
    opt = OPTIMIZERS["sgd"](model.parameters())
    result = lrwatch.find_lr(model, opt, digits, nn.CrossEntropyLoss(), end_lr=1e4, num_steps=120)
    assert result.stop_reason in {"diverged", "nonfinite"}
    assert len(result.lrs) < 120 and result.blowup_index == len(result.lrs) - 1
    finite = [v for v in result.smoothed[:-1]]
    if result.stop_reason == "diverged":
        assert result.smoothed[-1] > 4 * min(finite)
    assert all(v <= 4 * min(finite[: i + 1]) for i, v in enumerate(finite))
    assert result.blowup_fraction.lr == pytest.approx(result.lrs[-1] / 10)


@pytest.fixture(scope="module")
def curves(digits: Batches) -> dict[str, LRFinderResult]:
    out = {}
    for name, make in OPTIMIZERS.items():
        model = make_model()
        out[name] = lrwatch.find_lr(model, make(model.parameters()), digits, nn.CrossEntropyLoss())
    return out


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_suggestions_lie_in_the_descending_region(
    curves: dict[str, LRFinderResult], name: str
) -> None:
    result = curves[name]
    lows = int(np.argmin(result.smoothed))
    for rule in ("min_div_10", "valley", "steepest"):
        s = result.suggest(rule)
        assert s.lr is not None, s.reason
        k = int(np.argmin([abs(math.log(lr / s.lr)) for lr in result.lrs]))  # nearest swept LR
        assert k <= lows, rule
        assert result.smoothed[k + 2] < result.smoothed[max(k - 2, 0)], rule  # falling there
        assert result.smoothed[k] < result.smoothed[0], rule
    assert result.suggestion == result.min_div_10


def torch_lr_finder_steepest(lrs: list[float], losses: list[float]) -> float:
    """torch-lr-finder's ``plot(suggest_lr=True)``: trim 10 + 5, argmin of np.gradient."""
    lrs, losses = lrs[10:-5], losses[10:-5]
    return lrs[int(np.gradient(np.array(losses)).argmin())]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_steepest_equals_torch_lr_finder_rule_on_real_curves(
    curves: dict[str, LRFinderResult], name: str
) -> None:
    result = curves[name]
    assert result.steepest.lr == torch_lr_finder_steepest(list(result.lrs), list(result.smoothed))


def test_steepest_equals_torch_lr_finder_rule_on_random_curves() -> None:
    rng = np.random.default_rng(0)
    for n in rng.integers(20, 150, size=100):
        lrs = [1e-6 * 10 ** (7 * i / (n - 1)) for i in range(n)]
        losses = list(np.cumsum(rng.normal(size=n)) + 50)
        result = LRFinderResult(tuple(lrs), tuple(losses), tuple(losses), "completed", None)
        if result.steepest.lr is not None:  # None only when no slope is negative
            assert result.steepest.lr == torch_lr_finder_steepest(lrs, losses)
        else:
            assert np.gradient(np.array(losses[10:-5])).min() >= 0


def test_flat_curve_gives_no_suggestion_with_a_reason(digits: Batches) -> None:
    model = make_model()

    def constant(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return out.sum() * 0 + 1.0

    result = lrwatch.find_lr(model, OPTIMIZERS["sgd"](model.parameters()), digits, constant)
    assert result.stop_reason == "completed" and len(result.lrs) == 100
    for rule in RULES:
        s = result.suggest(rule)
        assert s.lr is None and s.reason, rule
    assert "flat" in result.suggestion.reason


def test_nan_at_the_first_step_stops_with_no_suggestion(digits: Batches) -> None:
    model = make_model()

    def nan_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return out.sum() * math.nan

    result = lrwatch.find_lr(model, OPTIMIZERS["sgd"](model.parameters()), digits, nan_loss)
    assert result.stop_reason == "nonfinite" and len(result.lrs) == 1
    assert all(result.suggest(r).lr is None for r in ("min_div_10", "valley", "steepest"))
    data = json.loads(result.to_json())  # strict JSON: NaN became null
    assert data["losses"] == [None] and data["suggestions"]["min_div_10"]["lr"] is None


def single(batches: Batches) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    yield batches[0]


@pytest.mark.parametrize("kind", ["list", "generator"])
def test_a_single_batch_is_cycled_for_the_whole_sweep(digits: Batches, kind: str) -> None:
    model = make_model()
    data = [digits[0]] if kind == "list" else single(digits)
    result = lrwatch.find_lr(
        model,
        OPTIMIZERS["adam"](model.parameters()),
        data,
        nn.CrossEntropyLoss(),
        end_lr=1e-2,
        num_steps=25,
    )
    assert len(result.lrs) == 25 and result.stop_reason == "completed"
    assert result.smoothed[-1] < result.smoothed[0]  # fitting one batch: the loss falls


@pytest.mark.parametrize(
    "kwargs",
    [
        {"start_lr": 0.0},
        {"start_lr": 1.0, "end_lr": 0.1},
        {"num_steps": 1},
        {"smooth": 1.0},
        {"diverge_threshold": 1.0},
    ],
    ids=["zero-start", "reversed", "one-step", "smooth-1", "threshold-1"],
)
def test_bad_settings_fail_before_touching_the_model(kwargs: dict[str, Any]) -> None:
    model = make_model()
    with pytest.raises(ConfigError):
        lrwatch.find_lr(model, OPTIMIZERS["sgd"](model.parameters()), [], nn.MSELoss(), **kwargs)


def test_empty_batches_are_an_error() -> None:
    model = make_model()
    with pytest.raises(ConfigError, match="empty"):
        lrwatch.find_lr(model, OPTIMIZERS["sgd"](model.parameters()), [], nn.MSELoss())


def test_to_json_lists_every_rule(curves: dict[str, LRFinderResult]) -> None:
    result = curves["sgd"]
    data = json.loads(result.to_json())
    assert set(data["suggestions"]) == set(RULES)
    assert data["suggestions"][data["default_rule"]]["lr"] == result.suggestion.lr
    assert data["lrs"] == list(result.lrs)


def test_plot_writes_a_png(curves: dict[str, LRFinderResult], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = curves["adam"].plot(tmp_path / "lr.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_get_it(
    curves: dict[str, LRFinderResult], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # an import of it now fails
    with pytest.raises(ConfigError, match="pip install matplotlib"):
        curves["adam"].plot(tmp_path / "lr.png")


def test_import_lrwatch_leaves_matplotlib_unloaded() -> None:
    code = "import sys, lrwatch; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_negative_loss_does_not_count_as_divergence(digits: Batches) -> None:
    model = make_model()

    def shifted(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out, target) - 10.0  # e.g. a log-likelihood

    opt = OPTIMIZERS["sgd"](model.parameters())
    result = lrwatch.find_lr(model, opt, digits, shifted, end_lr=1e-1, num_steps=30)
    assert result.stop_reason == "completed" and len(result.lrs) == 30
