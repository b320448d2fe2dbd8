"""What the hook has applied from the control file: the bookkeeping that must survive restarts.

The state is tiny (a run id, ids, the cuts and clips in force, stop) and lives in two places:
the checkpoint, through ``Monitor.state_dict()``, and ``RUN_DIR/lrwatch_applied.json``,
rewritten atomically after every new action. A trainer resumed from a checkpoint of the same
run takes whichever of the two knows more, so it neither reapplies nor loses an action; a new
run in the same directory (no state loaded) records the control file's last id as ``base`` and
applies only what comes after it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lrwatch.control import write_atomic
from lrwatch.schema import ALLOWED_LR_FACTORS, Action, ActionKind

STATE_VERSION = 1


@dataclass
class Applied:
    """The actions applied so far and what is in force because of them."""

    ids: list[int] = field(default_factory=list)
    cuts: dict[int, int] = field(default_factory=dict)  # id -> factor, for undo by id
    clips: dict[int, float] = field(default_factory=dict)  # id -> max_norm
    stop: bool = False
    run_id: str = ""  # the training run these belong to ("" in states saved before run ids)
    base: int = 0  # actions up to this id belong to an earlier run in the same directory

    @property
    def last_id(self) -> int:
        return max(self.ids[-1] if self.ids else 0, self.base)

    @property
    def lr_factor(self) -> float:
        """Cumulative divisor of the scheduler's LR (cuts compound; 1.0 = none)."""
        return float(math.prod(self.cuts.values()))

    @property
    def max_norm(self) -> float | None:
        """max_norm of the clip in force: the most recent clip not undone."""
        return self.clips[max(self.clips)] if self.clips else None

    def apply(self, action: Action) -> None:
        """Record ``action`` (already validated by the control-file reader)."""
        if action.action is ActionKind.LR_CUT and action.factor is not None:
            self.cuts[action.id] = action.factor
        elif action.action is ActionKind.CLIP and action.max_norm is not None:
            self.clips[action.id] = action.max_norm
        elif action.action is ActionKind.STOP:
            self.stop = True
        elif action.action is ActionKind.UNDO and action.target is not None:
            self.cuts.pop(action.target, None)
            self.clips.pop(action.target, None)
        self.ids.append(action.id)

    def to_json(self) -> dict[str, Any]:
        # Pairs, not dicts: JSON would turn the int ids into string keys.
        return {
            "version": STATE_VERSION,
            "applied_ids": list(self.ids),
            "cuts": [[i, f] for i, f in self.cuts.items()],
            "clips": [[i, n] for i, n in self.clips.items()],
            "stop": self.stop,
            "run_id": self.run_id,
            "base": self.base,
        }

    @classmethod
    def from_json(cls, doc: Any) -> Applied:
        """Validate a state written by :meth:`to_json`; raise ValueError if it is not one."""
        if not isinstance(doc, dict) or doc.get("version") != STATE_VERSION:
            raise ValueError(f"not an lrwatch control state of version {STATE_VERSION}")
        ids, cuts, clips, stop = (doc.get(k) for k in ("applied_ids", "cuts", "clips", "stop"))
        if not (isinstance(ids, list) and all(type(i) is int for i in ids)):
            raise ValueError("applied_ids must be a list of integers")
        if ids != sorted(set(ids)):
            raise ValueError("applied_ids must increase")
        if not (isinstance(cuts, list) and all(_pair(c) for c in cuts)):
            raise ValueError("cuts must be [id, factor] pairs")
        if not all(type(c[1]) is int and c[1] in ALLOWED_LR_FACTORS for c in cuts):
            raise ValueError(f"a cut factor is not one of {ALLOWED_LR_FACTORS}")
        if not (isinstance(clips, list) and all(_pair(c) for c in clips)):
            raise ValueError("clips must be [id, max_norm] pairs")
        if not all(math.isfinite(c[1]) and c[1] > 0 for c in clips):
            raise ValueError("a clip max_norm is not a finite number > 0")
        if not isinstance(stop, bool):
            raise ValueError("stop must be true or false")
        run_id, base = doc.get("run_id", ""), doc.get("base", 0)
        if not isinstance(run_id, str) or type(base) is not int or base < 0:
            raise ValueError("run_id must be a string and base an integer >= 0")
        return cls(
            ids=list(ids),
            cuts={c[0]: c[1] for c in cuts},
            clips={c[0]: float(c[1]) for c in clips},
            stop=stop,
            run_id=run_id,
            base=base,
        )

    @classmethod
    def load(cls, path: Path) -> Applied | None:
        """The state saved in ``path``, None if there is none; OSError/ValueError if unreadable."""
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            return None
        return cls.from_json(json.loads(text))

    def save(self, path: Path) -> None:
        write_atomic(path, self.to_json())


def _pair(x: Any) -> bool:
    return (
        isinstance(x, list | tuple)
        and len(x) == 2
        and type(x[0]) is int
        and isinstance(x[1], int | float)
        and not isinstance(x[1], bool)
    )
