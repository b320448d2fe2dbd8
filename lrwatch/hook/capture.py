"""Where a step's loss comes from: forward hooks on the criterion or the model, or ``mon.log``.

The loss of an optimizer step is the mean of the losses of the grad-enabled forwards since the
previous step (gradient accumulation gives several). They are found, in order of preference, in
the values the user logs, the outputs of the ``criterion`` module, or a model output carrying
``.loss`` (Hugging Face style). Forwards under ``no_grad`` are evaluation and never count.
Everything stays a device tensor: capturing a loss queues no host transfer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from lrwatch import schema
from lrwatch.events.writer import EventWriter
from lrwatch.hook.rows import RowBuffer

logger = logging.getLogger(__name__)

Tensor = torch.Tensor


class LossCapture:
    """The losses seen since the last optimizer step."""

    def __init__(self) -> None:
        self.captured: list[Tensor] = []  # from the forward hooks
        self._explicit: list[Tensor] = []  # from mon.log(loss=...) before the step
        self._forwards = 0  # grad-enabled model forwards since the step
        self._has_criterion = False

    def attach(self, model: torch.nn.Module, criterion: torch.nn.Module | None) -> list[Any]:
        """Register the forward hooks; the caller keeps (and later removes) the handles."""
        handles: list[RemovableHandle] = [model.register_forward_hook(self._on_model_forward)]
        if criterion is not None:
            self._has_criterion = True
            handles.append(criterion.register_forward_hook(self._on_criterion))
        return handles

    def take(self) -> Tensor | None:
        """The step's loss (explicit values win over captured ones); starts the next step."""
        losses = self._explicit or self.captured
        loss = mean(losses) if losses else None
        self._explicit, self.captured, self._forwards = [], [], 0
        return loss

    def take_share(self, share: int) -> Tensor | None:
        """The loss of a GradScaler-skipped iteration: the first ``share`` captured forwards."""
        if not share:
            return None
        loss = mean(self.captured[:share])
        del self.captured[:share]
        return loss

    def log(
        self,
        loss: Tensor | float,
        step: int | None,
        *,
        current: int,
        rows: RowBuffer,
        writer: EventWriter,
    ) -> None:
        """Route ``mon.log(loss=...)`` to the step it belongs to (``current``: steps so far).

        Logged between a forward and the next step it is that step's loss; logged after
        ``optimizer.step()`` it replaces the just-taken step's; with an explicit ``step`` that
        has no row waiting it is written as is.
        """
        t = scalar(loss) if isinstance(loss, Tensor) else torch.tensor(float(loss))
        last = rows.last()
        if step is not None and (last is None or last.step != step):
            writer.add_scalars(int(step), [schema.LOSS], t.reshape(1).float())
        elif step is None and (self._forwards or last is None or last.step != current):
            self._explicit.append(t)  # logged before its step: that step's loss
        elif last is not None:  # logged after optimizer.step(): the step just taken
            last.loss = t

    def step_of(self, step: int | None, current: int) -> int:
        """The step a value logged now belongs to, by the rule of :meth:`log` for the loss.

        After a grad-enabled forward and before its optimizer step: that coming step. Otherwise
        (after ``optimizer.step()``, or after an evaluation under ``no_grad``): the step taken.
        """
        if step is not None:
            return int(step)
        return current + 1 if self._forwards else current

    def _on_criterion(self, module: Any, inputs: Any, output: Any) -> None:
        if torch.is_grad_enabled() and isinstance(output, Tensor):  # no_grad: evaluation
            self.captured.append(scalar(output))

    def _on_model_forward(self, module: Any, inputs: Any, output: Any) -> None:
        if not torch.is_grad_enabled():
            return
        self._forwards += 1
        if self._has_criterion:
            return
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if isinstance(loss, Tensor):
            self.captured.append(scalar(loss))


def write_named(writer: EventWriter, step: int, scalars: Mapping[str, Tensor | float]) -> None:
    """``mon.log(**{"val/loss": v})``: tensors stacked on their device, floats as they are."""
    tensors = {k: scalar(v) for k, v in scalars.items() if isinstance(v, Tensor)}
    floats = {k: float(v) for k, v in scalars.items() if not isinstance(v, Tensor)}
    if tensors:
        device = next(iter(tensors.values())).device
        values = torch.stack([v.to(device, torch.float32) for v in tensors.values()])
        writer.add_scalars(step, list(tensors), values)
    if floats:
        writer.add_scalars(step, list(floats), list(floats.values()))


def share(n_captured: int, n_skipped: int) -> int:
    """Forwards per iteration when ``n_captured`` split evenly over the skips and the step.

    0 when they do not: the losses then all go to the real step rather than being guessed.
    """
    n_iterations = n_skipped + 1
    return n_captured // n_iterations if n_captured % n_iterations == 0 else 0


def mean(losses: list[Tensor]) -> Tensor:
    return losses[0] if len(losses) == 1 else torch.stack([t.float() for t in losses]).mean()


def scalar(t: Tensor) -> Tensor:
    """A detached 0-d loss (a per-sample loss vector is averaged)."""
    t = t.detach()
    return t if t.dim() == 0 else t.float().mean()


class BackwardEnd:
    """Calls ``callback`` once at the end of each backward pass through the model's output.

    Why there: the gradients are complete and nobody has clipped them yet (the user's
    ``clip_grad_norm_``, Lightning's ``gradient_clip_val``, HF's ``max_grad_norm`` and lrwatch's
    own clip all come later). The first of two hooks to fire in a backward pass queues an
    autograd engine callback, which queues ``callback``: the engine runs callbacks in the order
    queued, including those queued by a running callback, so ``callback`` runs after every
    callback queued during the pass, DDP's (which writes the averaged gradients) and FSDP2's
    (which writes the sharded ones) included. The hooks: one on the model's output tensor (FSDP2
    assigns its sharded gradients itself, so no parameter hook fires there), and a
    post-accumulate-grad hook on each plain parameter (they run eagerly even when the model is
    compiled, where a hook on an output inside the graph would break it). Nothing here raises
    into backward.
    """

    def __init__(self, callback: Callable[[], None]) -> None:
        self._callback = callback
        self._queued = False
        self._warned = False
        self._on_output = True  # hook the output tensor: only when no parameter hook can fire

    def attach(self, model: torch.nn.Module, params: list[Tensor]) -> list[Any]:
        """Register the hooks; the caller keeps (and later removes) the handles."""
        handles = [model.register_forward_hook(self._on_forward)]
        for p in params:
            if p.requires_grad and p.is_leaf and not hasattr(p, "device_mesh"):
                register = p.register_post_accumulate_grad_hook
                handles.append(register(self._on_grad))  # type: ignore[no-untyped-call]
        # A tensor hook per forward costs tens of microseconds: only FSDP2-style models, whose
        # every parameter is a DTensor, need it.
        self._on_output = len(handles) == 1
        return handles

    def _on_forward(self, module: Any, inputs: Any, output: Any) -> None:
        if torch.is_grad_enabled():
            self._queued = False  # a backward that failed midway must not silence the next
            if not self._on_output or torch.compiler.is_compiling():
                return  # the parameters' hooks do it (inside a compiled graph too)
            t = _first_grad_tensor(output)
            if t is not None:
                t.register_hook(self._on_grad)  # type: ignore[no-untyped-call]

    def _on_grad(self, tensor: Tensor) -> None:
        if not self._queued:
            self._queued = True
            self._guard(lambda: _queue(self._first))

    def _first(self) -> None:  # runs where backward ends, maybe before DDP's or FSDP's own
        self._guard(lambda: _queue(self._last))

    def _last(self) -> None:  # after every callback queued during the pass
        self._queued = False
        self._guard(self._callback)

    def _guard(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as exc:  # the hook boundary: an exception here would fail backward()
            if not self._warned:
                self._warned = True
                logger.warning("lrwatch: end-of-backward measure failed (%r); skipped", exc)


def _queue(fn: Callable[[], None]) -> None:
    torch.autograd.Variable._execution_engine.queue_callback(fn)


def _first_grad_tensor(output: Any) -> Tensor | None:
    """The first tensor requiring grad in a model output (tensor, sequence or mapping)."""
    if isinstance(output, Tensor):
        return output if output.requires_grad else None
    items = output.values() if isinstance(output, Mapping) else output
    if isinstance(items, tuple | list) or isinstance(output, Mapping):
        for item in items:
            if isinstance(item, Tensor) and item.requires_grad:
                return item
    return None
