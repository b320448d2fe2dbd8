"""The contract between lrwatch's stages: tag names, value types and their JSON forms.

Everything that crosses a stage boundary (hook -> events -> reader -> detectors -> policy ->
control -> hook) is defined here, with the standard library only, so that the hook side never
imports the daemon side and the README tables can be tested against these constants.

Readers of JSON documents ignore unknown keys and refuse a newer major ``version``.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

# --------------------------------------------------------------------------------------------
# Tag names written by the hook (see README "What is recorded").
# TensorBoard's Time Series tab sorts cards by tag, groups them by the part before the first "/"
# and, on a first visit, expands only the first two groups (tensorboard/webapp/metrics: the
# reducer of the tag metadata, ``groupCardIdWithMetdata``, ``compareTagNames``). So the names are
# chosen for that order: "lrwatch" holds the headline charts only; "lrwatch.decisions" (the
# daemon's) sorts next; "lrwatch.diagnostics" before the per-tensor sections, so a run without
# decisions never opens with hundreds of per-layer cards; bookkeeping ("lrwatch_control") after
# every "lrwatch." group ("." < "_"). Files written before this naming are read through
# LEGACY_TAGS, so old runs analyse as before.
# --------------------------------------------------------------------------------------------
PREFIX = "lrwatch"

LOSS = "lrwatch/loss"  # every optimizer step: the loss of that step (mean over accumulation)
LR = "lrwatch/lr"  # effective LR of param group 0 (after any lrwatch cut)
GRAD_NORM = "lrwatch/grad_norm"  # global L2 norm of the gradients the optimizer stepped with
UPDATE_RATIO = "lrwatch/update_ratio"  # ||theta_after - theta_before|| / ||theta_before||
# log10 of UPDATE_RATIO: Custom Scalars has no log axis in its layout, and the 1e-4..1e-2 band
# is invisible on a linear one.
UPDATE_RATIO_LOG10 = "lrwatch/update_ratio_log10"

NONFINITE = "lrwatch.diagnostics/nonfinite"  # every step: 1.0 if the loss or a gradient was NaN/Inf
WEIGHT_NORM = "lrwatch.diagnostics/weight_norm"  # global L2 norm of the parameters after the step
LOSS_SCALE = "lrwatch.diagnostics/loss_scale"  # GradScaler's scale, when a scaler is attached
SKIPPED = "lrwatch.diagnostics/skipped_step"  # 1.0 when GradScaler skipped the step (inf grads)
GRAD_NORM_PRECLIP = "lrwatch.diagnostics/grad_norm_preclip"  # before an lrwatch clip (if any)

CLIP_MAX_NORM = "lrwatch_control/clip_max_norm"  # max_norm of an lrwatch clip action in force
LR_FACTOR = "lrwatch_control/lr_factor"  # cumulative divisor applied by lrwatch cuts (1.0 = none)
CONTROL_ACK = "lrwatch_control/ack"  # id of a control action, at the step it was applied
STOP = "lrwatch_control/stop"  # 1.0 at the step a stop action was applied
CLOSED = "lrwatch_control/closed"  # written last by Monitor.close(): all of the run is in
# The validation loss at a step whose weights the hook now keeps in memory (a new best): a stop
# action may name this step to have them restored. Only a hook that writes it understands that.
KEPT_BEST = "lrwatch_control/kept_best"

# Validation-loss names, in order of preference: the analyzer's default monitored metric, and
# what the hook keeps the best weights of (lower is better for every one of them).
VAL_LOSS_TAGS = (
    "val/loss",
    "val_loss",
    "eval/loss",
    "eval_loss",
    "validation/loss",
    "validation_loss",
    "valid/loss",
    "Loss/val",
    "loss/val",
    "Loss/validation",
)

LR_GROUP_FMT = "lrwatch/lr/group{}"  # param groups 1..n-1; group 0 is LR
PER_TENSOR_PREFIXES = {
    "grad_norm": "lrwatch.grad_norm",
    "update_ratio": "lrwatch.update_ratio",
    "weight_norm": "lrwatch.weight_norm",
}

# Names before the Time Series order above (lrwatch <= 0.x of issue 12): read as today's.
LEGACY_TAGS = {
    "lrwatch/nonfinite": NONFINITE,
    "lrwatch/weight_norm": WEIGHT_NORM,
    "lrwatch/loss_scale": LOSS_SCALE,
    "lrwatch/skipped_step": SKIPPED,
    "lrwatch/grad_norm_preclip": GRAD_NORM_PRECLIP,
    "lrwatch/clip_max_norm": CLIP_MAX_NORM,
    "lrwatch/lr_factor": LR_FACTOR,
    "lrwatch/control/ack": CONTROL_ACK,
    "lrwatch/stop": STOP,
    "lrwatch/closed": CLOSED,
}

# The daemon writes its own findings and decisions into this sub-run of each run, so TensorBoard
# shows them on the same step axis without touching the trainer's files. A sub-run, not a file
# in the run itself: TensorBoard (without --reload_multifile) tails only the newest event file
# of a directory, so a daemon file there would freeze the trainer's live charts.
DAEMON_SUBRUN = "lrwatch_daemon"
HOOK_FILE_SUFFIX = ".lrwatch"  # the hook's event files end with it; the daemon looks for it
FINDING_TAG_FMT = "lrwatch.findings/{}"  # per finding kind: severity at its step, 0 elsewhere
DECISION_TAG_FMT = "lrwatch.decisions/{}"  # per action: factor, max_norm or 1; 0 elsewhere
DECISION_TEXT_TAG = "lrwatch_daemon/decisions"  # text summary with the reason

CONTROL_FILENAME = "lrwatch_control.json"  # written by the daemon / `lrwatch apply`
APPLIED_FILENAME = "lrwatch_applied.json"  # written by the hook: what it applied, for resumes
AUDIT_FILENAME = "lrwatch_audit.jsonl"  # written by the daemon: decisions, acks, hook runs


def lr_group_tag(index: int) -> str:
    """Tag of param group ``index``'s effective LR (group 0 is :data:`LR`)."""
    return LR if index == 0 else LR_GROUP_FMT.format(index)


def current_tag(tag: str) -> str:
    """``tag`` under today's name: a tag of an older lrwatch file is renamed, others pass."""
    return LEGACY_TAGS.get(tag, tag)


def per_tensor_tag(quantity: str, param_name: str) -> str:
    """Tag of one tensor's ``quantity``: ``grad_norm``, ``update_ratio`` or ``weight_norm``."""
    try:
        prefix = PER_TENSOR_PREFIXES[quantity]
    except KeyError:
        raise ValueError(
            f"unknown per-tensor quantity {quantity!r}; one of {sorted(PER_TENSOR_PREFIXES)}"
        ) from None
    return f"{prefix}/{param_name}"


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------
class Kind(enum.StrEnum):
    """What a detector found. The values are the JSON words."""

    NONFINITE = "nonfinite"
    EXPLOSION = "explosion"
    PLATEAU = "plateau"
    OSCILLATION = "oscillation"
    RATIO_HIGH = "ratio_high"
    RATIO_LOW = "ratio_low"
    OVERFIT = "overfit"
    DIVERGENCE = "divergence"
    SLOW_PROGRESS = "slow_progress"


class Severity(enum.StrEnum):
    """How urgent a finding is; ``info`` never warrants a warning on a healthy run."""

    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


class ActionKind(enum.StrEnum):
    """What a decision or a control action does. The values are the JSON words."""

    LR_CUT = "lr_cut"
    CLIP = "clip"
    STOP = "stop"
    RAISE_LR_ADVICE = "raise_lr_advice"  # decisions only: never written to a control file
    UNDO = "undo"  # control actions only: undo an earlier cut or clip by id
    ROLLBACK = "rollback"  # restore the weights the hook kept from at or before ``to_step``


ALLOWED_LR_FACTORS = (2, 5, 10)
CONTROL_ACTIONS = (
    ActionKind.LR_CUT,
    ActionKind.CLIP,
    ActionKind.STOP,
    ActionKind.UNDO,
    ActionKind.ROLLBACK,
)


class Scalar(NamedTuple):
    """One scalar value read from an event file.

    A NamedTuple rather than a frozen dataclass: equally immutable, but built about 2.5x faster,
    and the reader builds one per value (bench/reader_throughput.py).
    """

    tag: str
    step: int
    wall_time: float
    value: float


@dataclass(frozen=True)
class Finding:
    """What one detector saw at one step, with the numbers that made it say so."""

    kind: Kind
    step: int
    tag: str
    severity: Severity
    evidence: Mapping[str, Any]
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "step": self.step,
            "tag": self.tag,
            "severity": self.severity.value,
            "evidence": _jsonable(dict(self.evidence)),
            "message": self.message,
        }


@dataclass(frozen=True)
class Decision:
    """What the policy decided at one step, and why.

    ``factor`` is set for lr_cut, ``max_norm`` for clip, ``to_step`` for rollback (and for a
    stop that restores the weights the hook kept at that step).
    """

    step: int
    action: ActionKind
    reason: str
    factor: int | None = None
    max_norm: float | None = None
    findings: tuple[Finding, ...] = ()
    to_step: int | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"step": self.step, "action": self.action.value}
        if self.factor is not None:
            doc["factor"] = self.factor
        if self.max_norm is not None:
            doc["max_norm"] = json_number(self.max_norm)
        if self.to_step is not None:
            doc["to_step"] = self.to_step
        doc["reason"] = self.reason
        doc["findings"] = [f.to_json() for f in self.findings]
        return doc


@dataclass(frozen=True)
class Action:
    """One entry of a control file. Ids increase monotonically within a run."""

    id: int
    action: ActionKind
    factor: int | None = None  # lr_cut
    max_norm: float | None = None  # clip
    target: int | None = None  # undo: id of the cut or clip to undo
    reason: str = ""
    source: str = "human"  # "daemon" or "human"
    issued_at: float = 0.0  # wall time
    to_step: int | None = None  # rollback: the last good step

    def to_json(self) -> dict[str, Any]:
        doc = {k: v for k, v in asdict(self).items() if v is not None}
        doc["action"] = self.action.value
        return doc


CONTROL_VERSION = 1


@dataclass(frozen=True)
class ControlFile:
    """The whole control file: every action ever issued for the run, oldest first."""

    actions: tuple[Action, ...] = ()
    version: int = CONTROL_VERSION
    run: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "run": self.run,
            "actions": [a.to_json() for a in self.actions],
        }


ANALYSIS_VERSION = 1


@dataclass(frozen=True)
class Analysis:
    """The document `lrwatch analyze --json` prints."""

    run: str
    findings: tuple[Finding, ...] = ()
    decisions: tuple[Decision, ...] = ()
    metric: str = ""
    version: int = ANALYSIS_VERSION
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "run": self.run,
            "metric": self.metric,
            "findings": [f.to_json() for f in self.findings],
            "decisions": [d.to_json() for d in self.decisions],
            **_jsonable(dict(self.extra)),
        }


def json_number(x: float) -> float | str:
    """``x`` as strict JSON allows it: NaN/Inf become the strings ``"nan"``, ``"inf"``."""
    return x if math.isfinite(x) else str(x)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float):
        return json_number(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj
