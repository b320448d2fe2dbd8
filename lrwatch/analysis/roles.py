"""Which tag plays which part: lrwatch's own tags first, then the names other loggers use.

A run written by a plain ``SummaryWriter``, Lightning or Hugging Face has no ``lrwatch/*`` tags,
but its ``train/loss`` or ``lr-AdamW`` mean the same thing. Each role lists its aliases in order
of preference; the first one a run has wins, so lrwatch's own tag beats a user's duplicate.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Literal

from lrwatch import schema

Role = Literal[
    "loss",
    "metric",
    "grad_norm",
    "lr",
    "update_ratio",
    "nonfinite",
    "loss_scale",
    "skipped",
    "weight_norm",
]

ALIASES: Mapping[Role, tuple[str, ...]] = {
    # per-step training loss
    "loss": (
        schema.LOSS,
        "train/loss",
        "train_loss",
        "train/loss_step",
        "train_loss_step",
        "training_loss",
        "Loss/train",
        "loss/train",
        "loss",
    ),
    # validation loss: the default monitored metric when a run logs one
    "metric": schema.VAL_LOSS_TAGS,
    # Before clipping first: a clipped norm is pinned at max_norm and hides the explosion.
    "grad_norm": (
        schema.GRAD_NORM_PRECLIP,
        schema.GRAD_NORM,
        "train/grad_norm",
        "grad_norm",
        "grad_2.0_norm_total",  # Lightning's grad_norm(model, 2)
        "grad_norm/total",
    ),
    "lr": (schema.LR, "train/learning_rate", "learning_rate", "train/lr", "lr"),
    "update_ratio": (schema.UPDATE_RATIO,),
    "nonfinite": (schema.NONFINITE,),
    "weight_norm": (schema.WEIGHT_NORM,),  # non-finite weights: no LR cut can help
    "loss_scale": (schema.LOSS_SCALE,),
    "skipped": (schema.SKIPPED,),
}
# Lightning's LearningRateMonitor: "lr-AdamW", or "lr-AdamW/pg1" for the first of several groups.
_LIGHTNING_LR = re.compile(r"^lr-[A-Za-z0-9_]+(/pg1)?$")


def role_of(tag: str) -> tuple[Role, int] | None:
    """The role ``tag`` can play and its rank among the aliases (0 is best), or None."""
    for role, names in ALIASES.items():
        if tag in names:
            return role, names.index(tag)
    if _LIGHTNING_LR.match(tag):
        return "lr", len(ALIASES["lr"])
    return None


def assign(tags: Iterable[str], *, metric: str | None = None) -> dict[Role, str]:
    """The best tag for each role among ``tags``; a configured ``metric`` replaces the aliases."""
    best: dict[Role, tuple[int, str]] = {}
    seen = set()
    for tag in tags:
        seen.add(tag)
        hit = role_of(tag)
        if hit is not None and (hit[0] not in best or hit[1] < best[hit[0]][0]):
            best[hit[0]] = (hit[1], tag)
    out = {role: tag for role, (_, tag) in best.items()}
    if metric is not None:
        out.pop("metric", None)
        if metric in seen:
            out["metric"] = metric
    return out


def is_lrwatch_run(tags: Iterable[str]) -> bool:
    """Whether the run was written by lrwatch's hook (its actions can be applied to it)."""
    return any(t.startswith(schema.PREFIX + "/") for t in tags)
