"""The weights at the best validation loss, kept so that a stop can end on them.

A run stopped because its validation loss turned up (or because it diverged, or ran out of LR
to cut) is at its best some steps *before* the stop. Keras offers ``EarlyStopping(
restore_best_weights=True)``, Lightning a ``ModelCheckpoint`` on ``val_loss``; lrwatch does it in
memory: each time ``mon.log`` receives a validation loss lower than any before, the hook copies
the weights and optimizer state (``Snapshots.take_best``) and writes ``lrwatch_control/kept_best``
at that step. The daemon, which sees that tag, names the step in its stop action, and the hook
restores that copy before stopping. A stop whose step is not the copy held (a newer best came in
meanwhile, or the hook was restarted) stops with the weights as they are.

Which validation loss: the first of ``schema.VAL_LOSS_TAGS`` (the analyzer's own order of
preference) among those logged; a more preferred one logged later takes over. Its value is read
on the host once per ``mon.log`` call that carries it (a sync for a device tensor): validation
happens every few hundred or thousand steps, never on the hot path.

Not under DDP or FSDP: only the writing rank sees ``mon.log``'s values, and a restore on one rank
alone would leave the replicas or shards disagreeing. No copies are kept there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from lrwatch.hook import ranks
from lrwatch.hook.snapshots import Snapshots
from lrwatch.schema import VAL_LOSS_TAGS

_PREFERENCE = {tag: i for i, tag in enumerate(VAL_LOSS_TAGS)}


class BestCopy:
    """Decides, for each ``mon.log`` call, whether its validation loss is a new best to copy."""

    def __init__(self, snapshots: Snapshots) -> None:
        self.snapshots = snapshots
        self.tag: str | None = None  # the validation loss followed
        self.value = math.inf

    def offer(
        self, scalars: Mapping[str, Any], step: int, optimizer: torch.optim.Optimizer
    ) -> float | None:
        """Copy the weights if ``scalars`` holds a new best validation loss; its value, or None."""
        if ranks.distributed():
            return None
        named = [t for t in scalars if t in _PREFERENCE]
        tag = min(named, key=lambda t: _PREFERENCE[t], default=None)
        if tag is None or (self.tag is not None and _PREFERENCE[tag] > _PREFERENCE[self.tag]):
            return None
        if tag != self.tag:
            self.tag, self.value = tag, math.inf
        raw = scalars[tag]
        value = float(raw.detach()) if isinstance(raw, torch.Tensor) else float(raw)
        if not math.isfinite(value) or value >= self.value:
            return None
        self.value = value
        self.snapshots.take_best(step, optimizer)
        return value
