"""The LR range test: sweep the learning rate geometrically and read a good one off the loss.

Leslie Smith's range test as fastai and torch-lr-finder practise it: one optimizer step per
batch, the LR rising geometrically from ``start_lr`` to ``end_lr``, the loss smoothed, the sweep
stopped once the loss blows up. The model and optimizer are put back exactly as they were
(weights, buffers, momentum, LRs), even when the loss function or a batch raises::

    result = lrwatch.find_lr(model, optimizer, loader, nn.CrossEntropyLoss())
    print(result.suggestion.lr, result.suggestion.reason)
    result.plot("lr_find.png")  # needs matplotlib

The rules that turn the curve into an LR live in :mod:`.suggest`.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lrwatch.errors import ConfigError
from lrwatch.lr_finder import suggest
from lrwatch.lr_finder.suggest import Suggestion

logger = logging.getLogger(__name__)

Batch = tuple[Any, Any]


@dataclass(frozen=True)
class LRFinderResult:
    """The swept curve and the LRs each rule reads off it.

    ``losses`` are the raw per-batch losses, ``smoothed`` their bias-corrected exponential
    average (what the rules read). ``stop_reason`` is ``"diverged"``, ``"nonfinite"`` or
    ``"completed"``; ``blowup_index`` is the step at which the sweep stopped for a blow-up.
    """

    lrs: tuple[float, ...]
    losses: tuple[float, ...]
    smoothed: tuple[float, ...]
    stop_reason: str
    blowup_index: int | None

    def suggest(self, rule: str = suggest.DEFAULT_RULE) -> Suggestion:
        """The LR one rule gives (see :data:`lrwatch.lr_finder.suggest.RULES`)."""
        return suggest.suggest(rule, self.lrs, self.smoothed, blowup_index=self.blowup_index)

    @property
    def suggestion(self) -> Suggestion:
        """lrwatch's pick, ``min_div_10``: minimum-loss LR / 10, the rule least moved by noise."""
        return self.suggest()

    @property
    def steepest(self) -> Suggestion:
        return self.suggest("steepest")

    @property
    def valley(self) -> Suggestion:
        return self.suggest("valley")

    @property
    def min_div_10(self) -> Suggestion:
        return self.suggest("min_div_10")

    @property
    def blowup_fraction(self) -> Suggestion:
        return self.suggest("blowup_fraction")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data; non-finite losses become ``None`` (JSON has no NaN)."""
        rules = {r: vars(self.suggest(r)) for r in suggest.RULES}
        return {
            "lrs": list(self.lrs),
            "losses": [_finite_or_none(v) for v in self.losses],
            "smoothed": [_finite_or_none(v) for v in self.smoothed],
            "stop_reason": self.stop_reason,
            "blowup_index": self.blowup_index,
            "default_rule": suggest.DEFAULT_RULE,
            "suggestions": rules,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    def plot(self, path: str | Path) -> Path:
        """Save loss vs LR (log axis) with each rule's suggestion marked; needs matplotlib."""
        from lrwatch.lr_finder.plot import plot_result

        return plot_result(self, Path(path))


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def sweep_lrs(start_lr: float, end_lr: float, num_steps: int) -> list[float]:
    """``num_steps`` LRs from ``start_lr`` to ``end_lr``, equally spaced in log space."""
    ratio = end_lr / start_lr
    return [start_lr * ratio ** (i / (num_steps - 1)) for i in range(num_steps)]


def find_lr(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Batch],
    criterion: Callable[[Any, Any], torch.Tensor],
    *,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_steps: int = 100,
    smooth: float = 0.05,
    diverge_threshold: float = 4.0,
) -> LRFinderResult:
    """Run the LR range test on ``model`` and restore it and ``optimizer`` afterwards.

    Args:
        batches: ``(inputs, targets)`` pairs; re-iterated (a DataLoader) or replayed (a one-shot
            iterator) when shorter than ``num_steps``.
        criterion: ``criterion(model(inputs), targets)`` is the loss to minimise.
        smooth: weight of each new loss in the exponential average (0 = no smoothing).
        diverge_threshold: stop once the smoothed loss exceeds this multiple of its best.
    """
    _validate(start_lr, end_lr, num_steps, smooth, diverge_threshold)
    lrs = sweep_lrs(start_lr, end_lr, num_steps)
    params = list(model.parameters())
    saved_model = copy.deepcopy(model.state_dict())
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    saved_modes = {m: m.training for m in model.modules()}
    saved_grads = [p.grad.detach().clone() if p.grad is not None else None for p in params]
    try:
        model.train()
        return _sweep(model, optimizer, _cycle(batches), criterion, lrs, smooth, diverge_threshold)
    finally:
        model.load_state_dict(saved_model)
        optimizer.load_state_dict(saved_optimizer)
        for param, grad in zip(params, saved_grads, strict=True):
            param.grad = grad
        for module, training in saved_modes.items():
            module.training = training


def _validate(
    start_lr: float, end_lr: float, num_steps: int, smooth: float, threshold: float
) -> None:
    if not 0 < start_lr < end_lr or not math.isfinite(end_lr):
        raise ConfigError(f"need 0 < start_lr < end_lr, got {start_lr:g} and {end_lr:g}")
    if num_steps < 2:
        raise ConfigError(f"num_steps must be at least 2, got {num_steps}")
    if not 0 <= smooth < 1:
        raise ConfigError(f"smooth must be in [0, 1), got {smooth:g}")
    if not threshold > 1:
        raise ConfigError(f"diverge_threshold must be > 1, got {threshold:g}")


def _cycle(batches: Iterable[Batch]) -> Iterator[Batch]:
    """Endless batches: re-iterate a re-iterable, replay a one-shot iterator from memory."""
    if isinstance(batches, Iterator):  # a one-shot iterator cannot be restarted: keep its batches
        seen: list[Batch] = []
        for batch in batches:
            seen.append(batch)
            yield batch
        if not seen:
            raise ConfigError("batches is empty")
        yield from itertools.cycle(seen)
        return
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ConfigError("batches is empty")


def _sweep(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[Batch],
    criterion: Callable[[Any, Any], torch.Tensor],
    lrs: list[float],
    smooth: float,
    threshold: float,
) -> LRFinderResult:
    losses: list[float] = []
    smoothed: list[float] = []
    average, best = 0.0, math.inf
    for step, lr in enumerate(lrs):
        for group in optimizer.param_groups:
            group["lr"] = lr
        inputs, targets = next(batches)
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(inputs), targets)
        value = float(loss.detach())
        losses.append(value)
        if not math.isfinite(value):
            smoothed.append(math.nan)
            return _result(lrs, losses, smoothed, "nonfinite", step)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        # bias-corrected EMA (Adam's correction): the first points are not dragged towards 0
        average = (1 - smooth) * average + smooth * value
        smoothed.append(average / (1 - (1 - smooth) ** (step + 1)) if smooth else value)
        best = min(best, smoothed[-1])
        if best > 0 and smoothed[-1] > threshold * best:  # a ratio means nothing below 0
            return _result(lrs, losses, smoothed, "diverged", step)
    return _result(lrs, losses, smoothed, "completed", None)


def _result(
    lrs: list[float], losses: list[float], smoothed: list[float], reason: str, stop: int | None
) -> LRFinderResult:
    n = len(losses)
    logger.info("LR range test: %s after %d of %d steps", reason, n, len(lrs))
    return LRFinderResult(tuple(lrs[:n]), tuple(losses), tuple(smoothed), reason, stop)
