"""The hook side of the control file: apply each new action once, at a step boundary.

The monitor calls :meth:`Controller.before_step` from the optimizer's step pre-hook and
:meth:`Controller.after_step` from its post-hook. An LR cut is applied by dividing every param
group's lr just before the step and putting the scheduler's value back just after it. The user's
scheduler therefore never sees lrwatch's cut: chainable schedulers that read ``group["lr"]``
(StepLR, LinearLR, ReduceLROnPlateau, ...) keep their own sequence, and the LR the optimizer
steps with is always "the scheduler's value divided by the cumulative factor".

A clip acts on the gradients the optimizer steps with. Without a closure they exist before
``step()``, so the pre-hook clips them. With ``optimizer.step(closure)`` they are computed inside
``step()``: clipping in the pre-hook would touch the previous step's gradients, which the closure
then overwrites. The pre-hook instead hands the optimizer :meth:`Controller.clipping_closure`,
the user's closure followed by the clip, through the step pre-hook's documented way of replacing
``step``'s arguments (``optimizer.step`` itself is never patched). An optimizer that calls its
closure several times per step (LBFGS) sees clipped gradients after each call, as if the user
clipped inside the closure.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from lrwatch.control import read_control
from lrwatch.errors import ConfigError, ControlFileError
from lrwatch.hook import ranks
from lrwatch.hook.applied import Applied
from lrwatch.hook.snapshots import Snapshots
from lrwatch.schema import APPLIED_FILENAME, CONTROL_FILENAME, Action, ActionKind

logger = logging.getLogger(__name__)
# Not a failure, so a logger of its own: "one warning per failure" stays countable.
lr_charts_logger = logging.getLogger(__name__ + ".lr_charts")
_T = TypeVar("_T")

LOOK_SECS = 0.02  # look at the control file at least this often (one lstat, ~2 us)


class Controller:
    """Applies control-file actions (LR cut, clip, stop, undo) to one optimizer.

    Args:
        run_dir: directory holding the control file; None disables reading (state only).
        check_every: steps between two looks at the control file (each look is one ``lstat``).
        min_lr: a cut never takes a group's LR below this (nor raises one already below it).
        gate: an object-store logdir: the control file is not looked at before ``gate()`` is
            true (the uploader's first look at the bucket is over), and then ``pulled_record``
            (the bucket's applied record, as found) counts as the run directory's record too.

    Example::

        ctl = Controller(Path("runs/exp1"))
        ctl.before_step(optimizer, step)   # in the step pre-hook
        optimizer.step()                   # step(closure): see clipping_closure
        ctl.after_step(optimizer)          # in the step post-hook
    """

    def __init__(
        self,
        run_dir: Path | None,
        *,
        check_every: int = 10,
        min_lr: float = 0.0,
        snapshots: Snapshots | None = None,
        gate: Callable[[], bool] | None = None,
        pulled_record: Path | None = None,
    ) -> None:
        if not isinstance(check_every, int) or check_every < 1:
            raise ConfigError(f"check_every must be an integer >= 1, got {check_every!r}")
        if not isinstance(min_lr, int | float) or not math.isfinite(min_lr) or min_lr < 0:
            raise ConfigError(f"min_lr must be a finite number >= 0, got {min_lr!r}")
        self.run_dir = Path(run_dir) if run_dir is not None else None
        # Looked at up to 50 times a second: the path is joined once, and whether this is a
        # multi-rank run is asked once (the rank is fixed at construction, as for the writer).
        self._control_path = os.fspath(self.run_dir / CONTROL_FILENAME) if self.run_dir else ""
        self._distributed = ranks.distributed()
        self.check_every = check_every
        self.min_lr = float(min_lr)
        self.preclip_norm: torch.Tensor | None = None
        self.snapshots = snapshots  # in-memory copies for a rollback; None: rollbacks refused
        self._gate, self._pulled_record = gate, pulled_record
        self._applied = Applied()
        self._signature: tuple[int, int, int] | None = None  # control file (ino, mtime, size)
        self._stash: list[Any] | None = None  # scheduler's lr per group while lrwatch's is set
        self._written: list[Any] = []  # what lrwatch set, to spot a step that never finished
        self._synced = False
        self._last_look = -math.inf  # time.monotonic() of the last look at the control file
        self._unsaved = False  # the applied state is newer than lrwatch_applied.json
        self._warned: set[str] = set()
        # Whether this is a resumed run is known at the first check: load_state_dict comes
        # after construction. Until then the run directory's record is only a candidate.
        self._resumed: bool | None = None
        self._previous: Applied | None = None
        self._reack: list[int] = []  # applied ids whose ack may not have reached the disk
        if self.run_dir is not None and ranks.rank() == 0:
            self._previous = self._load_applied(self.run_dir / APPLIED_FILENAME)
            # One trainer per run directory: a temporary record is one a killed trainer left.
            for stale in self.run_dir.glob(f".{APPLIED_FILENAME}.*.tmp"):
                with contextlib.suppress(OSError):
                    stale.unlink()

    # ------------------------------------------------------------------ what is in force
    @property
    def lr_factor(self) -> float:
        """Cumulative divisor of the scheduler's LR (cuts compound; 1.0 = none)."""
        return self._applied.lr_factor

    @property
    def max_norm(self) -> float | None:
        """max_norm of the clip in force (the most recent clip not undone), or None."""
        return self._applied.max_norm

    @property
    def should_stop(self) -> bool:
        """True once a stop action has been applied."""
        return self._applied.stop

    @property
    def applied_ids(self) -> list[int]:
        """Ids of every action applied so far, oldest first."""
        return list(self._applied.ids)

    # ------------------------------------------------------------------ the hook
    def before_step(
        self, optimizer: torch.optim.Optimizer, step: int, *, closure: bool = False
    ) -> list[Action]:
        """Apply new actions (on check steps), then set this step's LR and clip the gradients.

        With ``closure=True`` the step's gradients do not exist yet: nothing is clipped here,
        the step must run :meth:`clipping_closure` instead of its closure.
        """
        new: list[Action] = []
        self.preclip_norm = None
        # Separate guards: a failure to read new actions must never suspend the ones in force
        # (a skipped _set_lr would run the step at the scheduler's uncut LR). Each stage is
        # skipped before its guard when it has nothing to do: most steps, every stage; inside
        # a training loop each Python call costs several microseconds (bench/hook_overhead.py).
        if self._stash is not None:
            self._guarded("restoring the lr", lambda: self._restore_unfinished(optimizer))
        now = time.monotonic()
        if not self._synced or step % self.check_every == 0 or self._due(now):
            self._synced = True
            self._last_look = now
            new = self._guarded("reading the control file", lambda: self._check(step)) or []
        kinds = {a.action for a in new} if new else set()
        if new:
            self._apply_restores(optimizer, new, step)
        rolled = ActionKind.ROLLBACK in kinds
        if self.snapshots is not None and not rolled and self.snapshots.due(step):
            self._guarded("copying the weights", lambda: self._take(optimizer, step))
        if self._applied.cuts:  # an LR factor in force (none: the scheduler's LR as it is)
            self._guarded("setting the lr", lambda: self._set_lr(optimizer))
        if ActionKind.LR_CUT in kinds or ActionKind.UNDO in kinds:
            self._guarded("reporting the lr", lambda: self._say_where_the_lr_shows(optimizer, step))
        if not closure and self._applied.clips:  # a clip in force
            self._guarded("clipping", lambda: self._clip(optimizer))
        return new

    def _apply_restores(
        self, optimizer: torch.optim.Optimizer, new: list[Action], step: int
    ) -> None:
        """The new actions that put weights back: a rollback, a stop naming the best copy."""
        for action in new:
            if action.action is ActionKind.ROLLBACK:
                self._guarded(
                    "rolling back", functools.partial(self._roll_back, optimizer, action, step)
                )
            elif action.action is ActionKind.STOP and action.to_step is not None:
                self._guarded(
                    "restoring the best weights",
                    functools.partial(self._restore_best, optimizer, action.to_step, step),
                )

    def _take(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        if self.snapshots is not None:
            self.snapshots.take(step, optimizer)

    def _roll_back(self, optimizer: torch.optim.Optimizer, action: Action, step: int) -> None:
        """Restore the newest in-memory copy at or before the action's ``to_step``."""
        to = action.to_step if action.to_step is not None else step
        if not self._same_copy_on_every_rank(optimizer, to):
            return
        if self.snapshots is None:
            self._warn_once(
                "a rollback was asked but this run keeps no copies of its weights "
                "(watch(rollback=...): 'auto' keeps them for models up to 32 MB)"
            )
            return
        got = self.snapshots.restore(to, optimizer)
        if got is None:
            self._warn_once(f"rollback to step {to}: no copy of the weights that old is kept")
            return
        logger.warning(
            "lrwatch: rolled the weights and optimizer state back to step %d (asked: %d) at "
            "step %d; this step applies no update",
            got,
            to,
            step,
        )

    def _restore_best(self, optimizer: torch.optim.Optimizer, to: int, step: int) -> None:
        """A stop naming the best copy's step: put those weights back; this step applies no
        update. Any other copy (or none) leaves the weights as they are, with one warning."""
        if self.snapshots is None or not self.snapshots.restore_best(to, optimizer):
            self._warn_once(
                f"the stop named the weights kept at step {to}; this run no longer holds them, "
                "so it stops with its current weights"
            )
            return
        logger.warning(
            "lrwatch: stopping at step %d with the weights of step %d (the best validation "
            "loss logged); this step applies no update",
            step,
            to,
        )

    def _same_copy_on_every_rank(self, optimizer: torch.optim.Optimizer, to: int) -> bool:
        """Whether every rank would restore a copy of the same step (or every rank none).

        Each rank keeps its own copies (its shards under FSDP2), and a copy can fail on one
        rank alone (its device out of memory): that rank's newest copy at or before ``to`` is
        then older, or missing. Restoring anyway leaves a model no rank ever trained (FSDP2:
        shards of two different steps; DDP: replicas that differ from then on). So under DDP
        or sharding the ranks compare, and if any differs no rank rolls back. This is one
        collective on the step that reads a rollback (rare: the daemon allows a few a run),
        joined by every rank: the action reached all of them through rank 0's broadcast.
        """
        mine: int | None = None
        try:
            snap = self.snapshots.restorable(to, optimizer) if self.snapshots else None
            mine = snap.step if snap is not None else None
        except Exception as err:  # noqa: BLE001 - this rank still joins the comparison
            self._warn_once(f"rollback to step {to}: finding the copy failed: {err!r}")
            mine = -1
        if not ranks.distributed():
            return True
        steps = ranks.gathered(mine)
        if len(set(steps)) == 1:
            return True
        self._warn_once(
            f"rollback to step {to}: the ranks' newest copies at or before it are of different "
            f"steps ({', '.join(map(str, steps))} by rank): no rank rolls back"
        )
        return False

    def _guarded(self, what: str, work: Callable[[], _T]) -> _T | None:
        """``work()``, or one warning and None if it raised."""
        try:
            return work()
        except Exception as err:  # noqa: BLE001 - the user's training must never break
            self._warn_once(f"control step failed ({what}): {err!r}")
            return None

    def clipping_closure(
        self, optimizer: torch.optim.Optimizer, closure: Callable[[], Any]
    ) -> Callable[[], Any]:
        """``closure`` followed by the clip in force (``closure`` itself when there is none).

        The closure's own exceptions reach the optimizer as before; a failing clip is one
        warning and unclipped gradients.
        """
        if self.max_norm is None:
            return closure

        def clipped() -> Any:
            loss = closure()
            try:
                self._clip(optimizer)
            except Exception as err:  # noqa: BLE001 - the user's training must never break
                self._warn_once(f"clipping the closure's gradients failed: {err!r}")
            return loss

        return clipped

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Put back the scheduler's LR values, so the scheduler never sees lrwatch's cut."""
        try:
            if self._stash is not None:
                for group, lr in zip(optimizer.param_groups, self._stash, strict=True):
                    group["lr"] = lr
        except Exception as err:  # noqa: BLE001 - the user's training must never break
            self._warn_once(f"restoring the scheduler's lr failed: {err!r}")
        finally:
            self._stash = None

    def _restore_unfinished(self, optimizer: torch.optim.Optimizer) -> None:
        """Undo the previous before_step if its optimizer.step raised (no after_step came).

        If nobody changed a group's lr since lrwatch set it, the scheduler's value is the stash;
        if something did (a scheduler step), that new value is taken as the scheduler's.
        """
        if self._stash is None:
            return
        for group, mine, theirs in zip(
            optimizer.param_groups, self._written, self._stash, strict=False
        ):
            if group["lr"] is mine:
                group["lr"] = theirs
        self._stash = None

    def _set_lr(self, optimizer: torch.optim.Optimizer) -> None:
        factor = self.lr_factor
        if factor == 1.0:
            return
        self._stash = [group["lr"] for group in optimizer.param_groups]
        self._written = []
        for group, lr in zip(optimizer.param_groups, self._stash, strict=True):
            group["lr"] = _divided(lr, factor, self.min_lr)
            self._written.append(group["lr"])

    def _say_where_the_lr_shows(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Warn, when the LR factor changes, that LR loggers reading ``param_groups`` between
        steps show the scheduler's LR, not the cut one (issue 12 item 7): after_step puts the
        scheduler's value back so the scheduler never compounds lrwatch's cut, and Lightning's
        LearningRateMonitor, the HF Trainer's ``learning_rate`` and most hand-written logging
        read ``group["lr"]`` between steps. lrwatch/lr is the LR the optimizer steps with."""
        if ranks.rank() != 0:
            return
        group = optimizer.param_groups[0]
        theirs = self._stash[0] if self._stash is not None else group["lr"]
        if not all(isinstance(lr, int | float | torch.Tensor) for lr in (theirs, group["lr"])):
            return  # setting the lr failed, and said so
        lr_charts_logger.warning(
            "lrwatch: from step %d the optimizer steps with lr %s (group 0: the scheduler's %s / "
            "%g, logged as lrwatch/lr); between steps param_groups keep the scheduler's %s, so "
            "LR charts that read them (Lightning's LearningRateMonitor 'lr-*', the HF Trainer's "
            "'learning_rate', your own) do not show lrwatch's cut",
            step, _show(group["lr"]), _show(theirs), self.lr_factor, _show(theirs),
        )  # fmt: skip

    def _clip(self, optimizer: torch.optim.Optimizer) -> None:
        self.preclip_norm = None
        max_norm = self.max_norm
        if max_norm is None:
            return
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if params:
            # The total norm stays a tensor: reading it here would force a device sync. With
            # DTensor gradients (FSDP2, TP) torch clips by the global norm, which it returns as
            # a DTensor: every rank clips, so every rank joins the collective of full_tensor().
            total = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
            full = getattr(total, "full_tensor", None)
            self.preclip_norm = full() if full is not None else total

    # ------------------------------------------------------------------ reading the file
    def _due(self, now: float) -> bool:
        """A look by elapsed time, at most every ``LOOK_SECS``: a fast trainer (150 steps/s)
        would otherwise apply an action up to ``check_every`` steps late. Not under DDP, where
        every rank must look at the same steps (rank 0 broadcasts what it read)."""
        return now - self._last_look >= LOOK_SECS and not self._distributed

    def _check(self, step: int) -> list[Action]:
        """Find new actions; under DDP rank 0 reads and every rank gets the same ones."""
        if not self._distributed:
            return self._poll(step)
        if ranks.rank() == 0:
            new: list[Action] = []
            try:
                new = self._poll(step)
            finally:  # the other ranks wait for this broadcast: it must happen whatever failed
                ranks.from_rank0((self.state_dict(), new))
            return new
        state, new = ranks.from_rank0(None)
        self._applied = Applied.from_json(state)
        return list(new)

    def _poll(self, step: int) -> list[Action]:
        """One lstat; parse only if the file changed; apply what is new. Never raises."""
        if self.run_dir is None:
            return []
        if self._gate is not None:
            if not self._gate():
                return []
            self._gate = None
            self._merge_pulled_record()
        if self._resumed is None:
            self._start_new_run()
        if self._unsaved:  # a full disk refused the last save: try again at every check
            self._save_applied()
        path = self._control_path
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return []
        except OSError as err:
            self._warn_once(f"cannot stat {path}: {err.strerror}")
            return []
        signature = (st.st_ino, st.st_mtime_ns, st.st_size)
        if signature == self._signature:
            return []
        self._signature = signature  # a bad version is refused once, retried when it changes
        try:
            control = read_control(Path(path))
        except ControlFileError as err:
            self._warn_once(f"control file refused, nothing applied: {err}")
            return []
        new = [a for a in control.actions if a.id > self._applied.last_id]
        for action in new:
            self._applied.apply(action)
            logger.info(
                "lrwatch: applied %s at step %d: %r", _describe(action), step, action.reason
            )
        if new:
            self._save_applied()
        return new

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """What has been applied: enough for a resumed run to neither reapply nor lose.

        A checkpoint taken before the first step already names its run: a process resumed
        from it must recognise the run directory's record of that run as its own.
        """
        if self._resumed is None and self.run_dir is not None and ranks.rank() == 0:
            self._start_new_run()
        return self._applied.to_json()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the run of ``state`` (ValueError if malformed) with the newest knowledge of it.

        The run directory's record (read at construction) can be newer than a checkpoint of the
        same run: the newest wins, so nothing applied after the checkpoint is applied twice.
        Every applied action is acknowledged again at the next step: a kill between saving the
        record and writing the ack must not leave an action that nothing ever acknowledges.
        """
        loaded = Applied.from_json(state)
        run_id = loaded.run_id
        known = [a for a in (self._applied, self._previous) if a is not None]
        # A state saved before run ids ("") is taken to be of the directory's run, as then.
        same = [loaded, *(a for a in known if a.run_id == run_id or not run_id)]
        self._applied = max(same, key=lambda a: a.last_id)
        self._resumed = True
        self._reack = list(self._applied.ids)
        self._signature = None  # re-read the control file (and re-sync ranks) at the next step
        self._synced = False
        logger.info(
            "lrwatch: resumed run %r with %d applied actions (last id %d)",
            run_id, len(self._applied.ids), self._applied.last_id,
        )  # fmt: skip
        self._save_applied()

    def _merge_pulled_record(self) -> None:
        """The bucket's applied record joins the local one (a run resumed on another host).

        It is the run directory's record if it knows more; and if a checkpoint of the same run
        was loaded before the bucket answered, the newer of the two wins, as in
        :meth:`load_state_dict` (the actions it adds come into force a few steps late).
        """
        if self._pulled_record is None:
            return
        pulled = self._load_applied(self._pulled_record)
        if pulled is None:
            return
        if self._previous is None or pulled.last_id > self._previous.last_id:
            self._previous = pulled
        if self._resumed and pulled.run_id == self._applied.run_id:
            if pulled.last_id > self._applied.last_id:
                self._applied = pulled
                self._reack = list(pulled.ids)
                self._save_applied()

    def take_reacks(self) -> list[int]:
        """Ids to acknowledge again at this step (after a resume); each is returned once."""
        ids, self._reack = self._reack, []
        return ids

    def _start_new_run(self) -> None:
        """No state was loaded: a new run, which inherits nothing an earlier run applied.

        The earlier run's record in the directory says how far it got; actions after that
        (such as one written before this run's first step) are this run's.
        """
        previous = self._previous
        self._applied = Applied(
            run_id=uuid.uuid4().hex[:12], base=previous.last_id if previous is not None else 0
        )
        self._resumed = False
        if previous is not None and previous.last_id:
            logger.warning(
                "lrwatch: new run %s: actions up to #%d in %s belong to run %r and are not "
                "applied (load mon.state_dict() from its checkpoint to continue that run)",
                self._applied.run_id, previous.last_id, self.run_dir, previous.run_id,
            )  # fmt: skip
            self._save_applied()  # the earlier run's record must not be taken for this one's
        else:
            logger.info("lrwatch: new run %s", self._applied.run_id)

    def _load_applied(self, path: Path) -> Applied | None:
        try:
            return Applied.load(path)
        except (OSError, ValueError) as err:
            self._warn_once(f"ignoring unreadable {path}: {err}")
            return None

    def _save_applied(self) -> None:
        if self.run_dir is None or ranks.rank() != 0:
            return
        try:
            self._applied.save(self.run_dir / APPLIED_FILENAME)
        except OSError as err:
            self._unsaved = True
            self._warn_once(f"cannot record applied actions in {self.run_dir} (will retry): {err}")
        else:
            self._unsaved = False

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            logger.warning("lrwatch: %s", message)


def _divided(lr: Any, factor: float, min_lr: float) -> Any:
    """lr / factor, floored at min_lr without raising an lr already below the floor."""
    if isinstance(lr, torch.Tensor):
        return torch.maximum(lr / factor, torch.clamp(lr, max=min_lr))
    return max(lr / factor, min(lr, min_lr))


def _show(lr: Any) -> str:
    """An LR for a log line; a device tensor is not read (that would sync with the device)."""
    if isinstance(lr, torch.Tensor):
        return f"{lr.item():.4g}" if lr.device.type == "cpu" and lr.numel() == 1 else "(tensor)"
    return f"{lr:.4g}" if isinstance(lr, int | float) else repr(lr)


def _describe(action: Action) -> str:
    detail = {
        ActionKind.LR_CUT: f" /{action.factor}",
        ActionKind.CLIP: f" max_norm={action.max_norm}",
        ActionKind.UNDO: f" of {action.target}",
        ActionKind.ROLLBACK: f" to step {action.to_step}",
        ActionKind.STOP: "" if action.to_step is None else f" on step {action.to_step}'s weights",
    }.get(action.action, "")
    return f"action {action.id} ({action.action.value}{detail})"
