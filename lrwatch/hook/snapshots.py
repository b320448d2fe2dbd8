"""In-memory copies of the weights and optimizer state, for a rollback the daemon may ask for.

A run whose LR was far too high can wreck its weights within a handful of steps (the zoo's MLPs
at 10x-100x: logits of 1e6 by step 5, dead units, a loss that no LR brings back). An LR cut
after that saves nothing: the practice of large runs (PaLM, OPT, BLOOM) is to restart from a
checkpoint from before the blow-up with a lower LR. The hook cannot reach the user's
checkpoints, so it keeps its own, in memory: the state at the first step (the initialisation)
and the newest ``keep`` states taken every ``every`` steps. A ``rollback`` action names the last
good step; the hook restores the newest copy at or before it, and the step that reads the action
applies no update (its gradients came from the wrecked weights).

What is copied: every parameter the optimizer steps and the optimizer's per-parameter state
(Adam's moments and step counts). Not copied: buffers such as BatchNorm running statistics, the
LR scheduler (the schedule goes on: cuts and rollbacks change the weights and the LR divisor,
not the schedule's clock), the GradScaler, the data loader (the batches that blew the run up
are not replayed, as in PaLM's restarts). Copies stay on the parameters' device (local shards
under FSDP2, every rank its own), so a copy or a restore is one ``copy_`` per tensor and needs
no collective; the controller's check that every rank would restore a copy of the same step is
one, on the step that reads a rollback only (:mod:`lrwatch.hook.controller`).

A stop may also restore a *best* copy: the weights at the lowest validation loss the run passed
to ``mon.log`` (:class:`lrwatch.hook.best.BestCopy` takes it), as Keras's ``EarlyStopping(
restore_best_weights=True)`` does. It is kept apart from the periodic copies: it holds the
weights after a step's update (the ones validated), and a rollback never lands on it.

Cost: one copy of the parameters and optimizer state every ``every`` steps (a memory pass, cheap
beside a training step) and at each new best validation loss, ``keep + 2`` copies held with the
best one. ``rollback="auto"`` keeps copies only when the parameters take at most
``AUTO_LIMIT_BYTES``; pass ``rollback=True`` to keep them for a larger model, if the device has
room for ``keep + 2`` copies of parameters and optimizer state.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from lrwatch.hook.stats import local

AUTO_LIMIT_BYTES = 32 << 20  # "auto": parameters up to 32 MB (8M fp32 values), ~400 MB held


@dataclass
class Snapshot:
    """The state of the optimizer's parameters at the start of ``step`` (before its update)."""

    step: int
    params: list[torch.Tensor]
    state: list[dict[str, Any]]


def param_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(p.numel() * p.element_size() for g in optimizer.param_groups for p in g["params"])


class Snapshots:
    """The first state and the newest ``keep`` ones taken every ``every`` steps."""

    def __init__(self, *, every: int = 100, keep: int = 2) -> None:
        self.every, self.keep = every, keep
        self.first: Snapshot | None = None
        self.recent: deque[Snapshot] = deque(maxlen=keep)
        self.best: Snapshot | None = None  # the weights at the best validation loss logged

    def due(self, step: int) -> bool:
        return self.first is None or step % self.every == 0

    @torch.no_grad()
    def take(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Copy the parameters and their optimizer state as they are before ``step``'s update.

        Once ``keep`` recent copies exist, the oldest one's tensors are reused: copying into
        memory already in place costs ~1 ms for the 1.86M-parameter AdamW MLP of
        bench/hook_overhead.py, fresh allocations 6-23 ms (page faults on every new block).
        """
        params = _params(optimizer)
        states = [optimizer.state.get(p, {}) for p in params]
        old = self.recent[0] if self.first is not None and len(self.recent) == self.keep else None
        snap = _refill(old, step, params, states) if old is not None else None
        if snap is None:
            snap = Snapshot(
                step, [p.detach().clone() for p in params], [_clone_state(s) for s in states]
            )
        if self.first is None:
            self.first = snap
        else:
            self.recent.append(snap)  # drops ``old`` from the deque when it was not reused

    @torch.no_grad()
    def take_best(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Copy the weights and optimizer state as they are now, as the best copy of ``step``
        (refilled in place when the shapes allow: a run improves many times)."""
        params = _params(optimizer)
        states = [optimizer.state.get(p, {}) for p in params]
        old = self.best
        snap = _refill(old, step, params, states) if old is not None else None
        self.best = snap or Snapshot(
            step, [p.detach().clone() for p in params], [_clone_state(s) for s in states]
        )

    @torch.no_grad()
    def restore_best(self, step: int, optimizer: torch.optim.Optimizer) -> bool:
        """Put back the best copy if it is the one of ``step`` (a stop names the copy it saw in
        the event file; a newer best since then is not the one it judged). True if restored."""
        if self.best is None or self.best.step != step:
            return False
        return _put_back(self.best, optimizer)

    def newest_at_or_before(self, step: int) -> Snapshot | None:
        found = [s for s in (self.first, *self.recent) if s is not None and s.step <= step]
        return max(found, key=lambda s: s.step, default=None)

    def restorable(self, to_step: int, optimizer: torch.optim.Optimizer) -> Snapshot | None:
        """The copy :meth:`restore` would put back: the newest at or before ``to_step`` that
        holds as many tensors as the optimizer steps."""
        snap = self.newest_at_or_before(to_step)
        return snap if snap is not None and len(snap.params) == len(_params(optimizer)) else None

    @torch.no_grad()
    def restore(self, to_step: int, optimizer: torch.optim.Optimizer) -> int | None:
        """Put back the newest copy at or before ``to_step``; drop this step's gradients so the
        step about to run changes nothing. The restored copy's step, or None if none is old
        enough (nothing is changed then)."""
        snap = self.restorable(to_step, optimizer)
        if snap is None or not _put_back(snap, optimizer):
            return None
        # Later copies hold the weights that went wrong: a second rollback must go further back.
        self.recent = deque((s for s in self.recent if s.step <= snap.step), maxlen=self.keep)
        return snap.step


def _put_back(snap: Snapshot, optimizer: torch.optim.Optimizer) -> bool:
    """Copy ``snap`` into the parameters and optimizer state and drop this step's gradients (the
    optimizer skips a parameter without one); False, changing nothing, if the parameters no
    longer match it."""
    params = _params(optimizer)
    if len(snap.params) != len(params) or any(
        a.shape != b.shape for a, b in zip(snap.params, params, strict=True)
    ):
        return False
    for p, saved, state in zip(params, snap.params, snap.state, strict=True):
        p.copy_(saved)
        p.grad = None
        _put_state(optimizer, p, state)
    return True


def _refill(
    old: Snapshot, step: int, params: list[torch.Tensor], states: list[dict[str, Any]]
) -> Snapshot | None:
    """``old``'s tensors overwritten with the current values, as the snapshot of ``step``; None
    when the shapes no longer match (parameters or state added, resized)."""
    if len(old.params) != len(params) or not all(
        a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
        for a, b in zip(old.params, params, strict=True)
    ):
        return None
    if not all(_same_layout(a, b) for a, b in zip(old.state, states, strict=True)):
        return None
    # Local tensors: DTensor has no sharding rule for _foreach_copy_ (torch 2.13 raises
    # NotImplementedError), so under FSDP2 every copy after the third failed and a rollback
    # restored an older copy than asked. A shard's local tensor is its memory: no collective.
    torch._foreach_copy_([local(s) for s in old.params], [local(p.detach()) for p in params])
    for saved, state in zip(old.state, states, strict=True):
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                saved[k].copy_(v.detach())
            else:
                saved[k] = v
    old.step = step
    return old


def _same_layout(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two optimizer states have the same keys, and tensors of one shape, dtype, device."""
    if a.keys() != b.keys():
        return False
    for k, v in a.items():
        w = b[k]
        if isinstance(v, torch.Tensor) != isinstance(w, torch.Tensor):
            return False
        if isinstance(v, torch.Tensor) and (v.shape, v.dtype, v.device) != (
            w.shape,
            w.dtype,
            w.device,
        ):
            return False
    return True


def _put_state(optimizer: torch.optim.Optimizer, p: torch.Tensor, saved: dict[str, Any]) -> None:
    """``saved`` as ``p``'s optimizer state, copied into the state's own tensors when they fit.

    Copying in place allocates nothing, so a restore cannot run out of memory on one rank after
    the others restored (their models would then hold different steps); a state that does not
    fit (none yet, resized) is cloned.
    """
    current = optimizer.state.get(p)
    if not saved:
        optimizer.state.pop(p, None)
    elif current is not None and _same_layout(current, saved):
        for k, v in saved.items():
            if isinstance(v, torch.Tensor):
                current[k].copy_(v)
            else:
                current[k] = v
    else:
        optimizer.state[p] = _clone_state(saved)


def _params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def _clone_state(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
