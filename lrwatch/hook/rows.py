"""Per-step rows of the monitor, kept on device until a batch of them is written.

A row is what every optimizer step records: the loss, the tensors whose finiteness decides the
non-finite flag, and host-side floats (LR per group, loss scale, skipped). Building a row queues
no host transfer; :meth:`RowBuffer.submit` resolves the flags of all waiting rows in four kernels
and hands a few stacked blocks (with the logging steps' events) to the writer thread, which
moves them to the host.

The host-side columns (:class:`HostColumns`) and the acknowledgement of control actions
(:func:`write_acks`) are here too: they are what a step writes besides the device values.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from lrwatch import schema
from lrwatch.events.writer import EventWriter


@dataclass(slots=True)
class Row:
    """One optimizer step's record (``loss`` may be replaced by ``mon.log`` until submitted)."""

    step: int
    wall_time: float
    loss: torch.Tensor | None
    grad_norm: torch.Tensor | None  # global, before clipping; its finiteness checks every grad
    host_tags: tuple[str, ...]
    host: list[float]


class HostColumns:
    """Tags and values of a row's host-side floats: LR per group, then loss scale and skipped.

    The tags tuple is rebuilt only when the number of param groups changes, so rows of the
    same shape share it and :meth:`RowBuffer.submit` writes them as one block.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, skips: Any) -> None:
        self._optimizer = optimizer
        self._skips = skips  # an _amp.SkipCounter, or None without a GradScaler
        self._amp = (schema.LOSS_SCALE, schema.SKIPPED) if skips is not None else ()
        self._tags: tuple[str, ...] = ()

    def values(self, *, skipped_scale: float | None = None) -> tuple[tuple[str, ...], list[float]]:
        """This step's LR per group (as the optimizer steps with it) and scale.

        ``skipped_scale``: a GradScaler-skipped iteration, which ran with that scale.
        """
        groups = self._optimizer.param_groups
        values = [float(g["lr"]) for g in groups]
        if len(groups) != len(self._tags) - len(self._amp):
            self._tags = tuple(schema.lr_group_tag(i) for i in range(len(groups))) + self._amp
        if self._skips is not None:
            if skipped_scale is None:
                values += [self._skips.scale, 0.0]
            else:
                values += [skipped_scale, 1.0]
        return self._tags, values


def write_acks(
    writer: EventWriter,
    step: int,
    acks: list[int],
    *,
    controller: Any,
    optimizer: torch.optim.Optimizer,
) -> None:
    """One event per control action id acknowledged at ``step``, on disk before training goes on.

    The caller submits the rows before ``step`` first, so every tag's steps stay in order.
    """
    c = controller
    groups = optimizer.param_groups
    tags = [schema.CONTROL_ACK, schema.LR_FACTOR, schema.CLIP_MAX_NORM, schema.STOP]
    tags += [schema.lr_group_tag(i) for i in range(len(groups))]
    for action_id in acks:
        values = [float(action_id), c.lr_factor, c.max_norm or 0.0, float(c.should_stop)]
        values += [float(g["lr"]) for g in groups]
        writer.add_scalars(step, tags, values)
    writer.flush(timeout=2.0)


class RowBuffer:
    """Rows waiting to be written, oldest first."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.events: dict[tuple[str, ...], list[tuple[int, float, torch.Tensor]]] = {}
        # Sharded runs: a logging step's values wait with its row until the next step has
        # checked that every rank measured it (see forget_measures); others go out at once.
        self.hold_events = False

    def add_event(self, step: int, tags: list[str], values: torch.Tensor) -> None:
        """A logging step's values (one event), written with the next batch of rows."""
        self.events.setdefault(tuple(tags), []).append((step, time.time(), values))

    def add(self, row: Row) -> None:
        self.rows.append(row)

    def last(self) -> Row | None:
        return self.rows[-1] if self.rows else None

    def forget_measures(self, step: int) -> None:
        """Drop ``step``'s measured values (its grad norm and logging block), not yet submitted.

        A sharded step some rank failed to measure summed the others' shards only: a wrong
        value, which must not be written. The loss and the rest of its row stay.
        """
        for row in self.rows:
            if row.step == step:
                row.grad_norm = None
        for tags, evs in list(self.events.items()):
            self.events[tags] = [e for e in evs if e[0] != step]
            if not self.events[tags]:
                del self.events[tags]

    def submit(self, writer: EventWriter, *, before: int | None = None) -> None:
        """Hand every row with ``step < before`` (all by default) to ``writer``, and the events.

        With ``hold_events``, only the events with ``step < before``.
        """
        events, self.events = self.events, {}
        if before is not None and self.hold_events:
            for tags, evs in list(events.items()):
                events[tags] = [e for e in evs if e[0] < before]
                later = [e for e in evs if e[0] >= before]
                if later:
                    self.events[tags] = later
        for tags, evs in events.items():  # same tags: one hand-off for all their steps
            if not evs:
                continue
            writer.add_rows(
                [e[0] for e in evs],
                tags,
                torch.stack([e[2] for e in evs]),
                wall_times=[e[1] for e in evs],
            )
        n = len(self.rows) if before is None else sum(r.step < before for r in self.rows)
        ready, self.rows = self.rows[:n], self.rows[n:]
        if not ready:
            return
        by_kind: dict[tuple[bool, bool], list[int]] = {}
        for i, row in enumerate(ready):
            by_kind.setdefault((row.loss is not None, row.grad_norm is not None), []).append(i)
        for (has_loss, has_norm), idx in by_kind.items():
            _device_rows(writer, ready, idx, has_loss=has_loss, has_norm=has_norm)
        by_tags: dict[tuple[str, ...], list[int]] = {}
        for i, row in enumerate(ready):
            by_tags.setdefault(row.host_tags, []).append(i)
        for tags, idx in by_tags.items():
            _rows_out(writer, ready, idx, tags, [ready[i].host for i in idx])


def _rows_out(
    writer: EventWriter,
    rows: list[Row],
    idx: list[int],
    tags: tuple[str, ...],
    values: torch.Tensor | list[list[float]],
) -> None:
    writer.add_rows(
        [rows[i].step for i in idx], tags, values, wall_times=[rows[i].wall_time for i in idx]
    )


def _device_rows(
    writer: EventWriter, rows: list[Row], idx: list[int], *, has_loss: bool, has_norm: bool
) -> None:
    """Loss, non-finite flag and grad norm of rows of one shape: a few kernels, no sync."""
    tags: list[str] = []
    cols: list[torch.Tensor] = []
    if has_loss:
        tags.append(schema.LOSS)
        cols.append(_column([rows[i].loss for i in idx]))
    if has_norm:
        cols.append(_column([rows[i].grad_norm for i in idx]))
    if cols:
        device = cols[0].device
        cols = [c.to(device) for c in cols]
        bad = ~torch.isfinite(torch.stack(cols)).all(dim=0)
        flags = bad.to(torch.float32)
    else:
        flags = torch.zeros(len(idx))
    tags.append(schema.NONFINITE)
    values = cols[:1] + [flags] + cols[1:] if has_loss else [flags, *cols]
    if has_norm:
        tags.append(schema.GRAD_NORM)
    _rows_out(writer, rows, idx, tuple(tags), torch.stack(values, dim=1))


def _column(values: list[torch.Tensor | None]) -> torch.Tensor:
    device = values[0].device  # type: ignore[union-attr]
    return torch.stack([v.reshape(()).to(device, torch.float32) for v in values])  # type: ignore[union-attr]
