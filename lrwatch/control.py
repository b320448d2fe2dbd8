"""The control file: a strict reader and an atomic, locked writer.

The daemon and ``lrwatch apply`` append actions to ``RUN_DIR/lrwatch_control.json``; the hook
(:mod:`lrwatch.hook.controller`) reads it. The file is a trust boundary, so the reader refuses
anything it cannot fully vouch for (one :class:`~lrwatch.errors.ControlFileError` naming the
reason), and the writer never leaves a half-written file for the hook to see: it writes a
temporary file in the same directory and renames it over the old one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import reprlib
import stat
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TypeGuard

from lrwatch.errors import ConfigError, ControlFileError, RunGone
from lrwatch.schema import (
    ALLOWED_LR_FACTORS,
    CONTROL_ACTIONS,
    CONTROL_FILENAME,
    CONTROL_VERSION,
    Action,
    ActionKind,
    ControlFile,
)

MAX_CONTROL_BYTES = 1 << 20  # ~10k actions; anything bigger is not something lrwatch wrote
# The hook acknowledges an id as a float32 TensorBoard value, exact up to 2**24.
MAX_ACTION_ID = 1 << 24
LOCK_FILENAME = ".lrwatch_control.lock"  # serialises the daemon and a human appending at once

# Which optional field each action needs; the others must be absent (or null).
_FIELD_OF = {
    ActionKind.LR_CUT: "factor",
    ActionKind.CLIP: "max_norm",
    ActionKind.UNDO: "target",
    ActionKind.ROLLBACK: "to_step",
}
# A stop may name a step whose kept weights the hook restores before stopping (a best copy).
_MAY_HAVE = {ActionKind.STOP: "to_step"}
_OPTIONAL = ("factor", "max_norm", "target", "to_step")
MAX_STEP = 1 << 53  # a step count a float64 TensorBoard step still holds exactly
_KINDS = {kind.value: kind for kind in CONTROL_ACTIONS}


def read_control(path: Path) -> ControlFile:
    """Read and validate a control file; raise ControlFileError with one reason if untrusted.

    Whatever is at ``path`` (a FIFO, socket, device or symlink swapped in at any moment, a huge
    or hostile document), this returns or raises ControlFileError; it never blocks or escapes.
    """
    try:
        return decode_control(_read_regular(path))
    except ControlFileError as err:
        raise ControlFileError(f"{path}: {err}") from None


def decode_control(raw: bytes) -> ControlFile:
    """Validate the bytes of a control file (strict UTF-8 JSON, no BOM); ControlFileError if not."""
    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        # ValueError also covers integers past Python's 4300-digit parsing limit.
        raise ControlFileError(f"not valid JSON (maybe still being written): {err}") from err
    return parse_control(doc)


def _read_regular(path: Path) -> bytes:
    """At most MAX_CONTROL_BYTES + 1 bytes of the regular file at ``path``.

    There is no lstat-then-open: whatever is checked must be what was opened, or a FIFO swapped
    in between would block ``open`` forever. So: open without following a symlink and without
    blocking (a FIFO opens at once, a socket fails), then fstat the descriptor itself.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(path, flags)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ControlFileError(
                f"{path}: is a symlink; lrwatch only reads a regular file"
            ) from None
        raise ControlFileError(f"{path}: cannot open: {err.strerror}") from err
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ControlFileError(f"{path}: not a regular file")
        if st.st_size > MAX_CONTROL_BYTES:
            raise ControlFileError(f"{path}: {st.st_size} bytes, over the {MAX_CONTROL_BYTES} cap")
        chunks, size = [], 0
        while size <= MAX_CONTROL_BYTES:
            chunk = os.read(fd, MAX_CONTROL_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as err:
        raise ControlFileError(f"{path}: cannot read: {err.strerror}") from err
    finally:
        os.close(fd)
    if size > MAX_CONTROL_BYTES:
        raise ControlFileError(f"{path}: grew over the {MAX_CONTROL_BYTES} byte cap")
    return b"".join(chunks)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number lrwatch accepts")


def parse_control(doc: Any) -> ControlFile:
    """Validate a decoded control document. Unknown keys are ignored (forward compatibility)."""
    if not isinstance(doc, dict):
        raise ControlFileError("top level must be a JSON object")
    version = doc.get("version")
    if not _is_int(version) or version < 1:
        raise ControlFileError(f"version must be a positive integer, got {_show(version)}")
    if version > CONTROL_VERSION:
        raise ControlFileError(
            f"version {version} is newer than this lrwatch understands ({CONTROL_VERSION}); "
            "upgrade lrwatch"
        )
    run = doc.get("run", "")
    if not _is_text(run):
        raise ControlFileError("run must be a string of Unicode text")
    entries = doc.get("actions")
    if not isinstance(entries, list):
        raise ControlFileError("actions must be a list")
    actions: list[Action] = []
    for i, entry in enumerate(entries):
        try:
            actions.append(_parse_action(entry, actions))
        except ControlFileError as err:
            raise ControlFileError(f"actions[{i}]: {err}") from None
    return ControlFile(actions=tuple(actions), version=version, run=run)


def _parse_action(entry: Any, earlier: list[Action]) -> Action:
    if not isinstance(entry, dict):
        raise ControlFileError("an action must be a JSON object")
    id_ = entry.get("id")
    if not _is_int(id_) or not 1 <= id_ <= MAX_ACTION_ID:
        raise ControlFileError(f"id must be an integer in 1..{MAX_ACTION_ID}, got {_show(id_)}")
    if earlier and id_ <= earlier[-1].id:
        raise ControlFileError(f"id {id_} does not increase (previous id {earlier[-1].id})")
    word = entry.get("action")
    kind = _KINDS.get(word) if isinstance(word, str) else None
    if kind is None:
        raise ControlFileError(f"unknown action {_show(word)}; one of {', '.join(_KINDS)}")
    fields = {name: entry.get(name) for name in _OPTIONAL}
    for name, value in fields.items():
        if name not in (_FIELD_OF.get(kind), _MAY_HAVE.get(kind)) and value is not None:
            raise ControlFileError(f"{name} does not belong to a {kind.value} action")
    _check_field(kind, fields, earlier)
    reason, source = entry.get("reason", ""), entry.get("source", "human")
    if not _is_text(reason) or not _is_text(source):
        raise ControlFileError("reason and source must be strings of Unicode text")
    issued_at = _finite(entry.get("issued_at", 0.0))
    if issued_at is None or issued_at < 0:
        shown = _show(entry.get("issued_at"))
        raise ControlFileError(f"issued_at must be a finite time >= 0, got {shown}")
    return Action(id=id_, action=kind, reason=reason, source=source, issued_at=issued_at, **fields)


def _check_field(kind: ActionKind, fields: dict[str, Any], earlier: list[Action]) -> None:
    if kind is ActionKind.LR_CUT and (
        not _is_int(fields["factor"]) or fields["factor"] not in ALLOWED_LR_FACTORS
    ):
        raise ControlFileError(
            f"factor must be one of {ALLOWED_LR_FACTORS}, got {_show(fields['factor'])}"
        )
    if kind is ActionKind.CLIP:
        norm = _finite(fields["max_norm"])
        if norm is None or norm <= 0:
            raise ControlFileError("max_norm must be a finite number > 0")
        fields["max_norm"] = norm
    needed = kind is ActionKind.ROLLBACK or fields["to_step"] is not None
    if needed and (not _is_int(fields["to_step"]) or not 0 <= fields["to_step"] <= MAX_STEP):
        raise ControlFileError(
            f"to_step must be a step in 0..2**53, got {_show(fields['to_step'])}"
        )
    if kind is ActionKind.UNDO:
        target = fields["target"]
        undoable = {a.id for a in earlier if a.action in (ActionKind.LR_CUT, ActionKind.CLIP)}
        if not _is_int(target) or target not in undoable:
            raise ControlFileError(
                f"target {_show(target)} is not the id of an earlier lr_cut or clip"
            )


def _is_int(x: Any) -> TypeGuard[int]:
    return isinstance(x, int) and not isinstance(x, bool)


def _finite(x: Any) -> float | None:
    """``x`` as a finite float, or None: not a number, NaN/Inf, or an int past float's range.

    A 400-digit JSON integer is a valid Python int that ``float`` and ``math.isfinite`` refuse
    with OverflowError; it must be refused as untrusted, not raised past the reader.
    """
    if not isinstance(x, int | float) or isinstance(x, bool):
        return None
    try:
        value = float(x)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


def _is_text(x: Any) -> TypeGuard[str]:
    """A str that can be written back as UTF-8 (JSON allows lone surrogates, files do not)."""
    if not isinstance(x, str):
        return False
    try:
        x.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_SHORT = reprlib.Repr()  # bounded depth and length: a hostile value may be 4000 digits or deep
_SHORT.maxstring = _SHORT.maxother = _SHORT.maxlong = 40


def _show(value: Any) -> str:
    """A value from the file, shortened for a one-line message."""
    return _SHORT.repr(value)


def write_atomic(path: Path, doc: Mapping[str, Any]) -> None:
    """Write JSON so a reader sees the old file or the new one, never a mix (temp + os.replace)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(
            fd, 0o644
        )  # mkstemp's 0600 would hide the file from a trainer run by another user
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # The rename itself must survive a crash too, or a restarted daemon could reissue an id.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    fd = os.open(run_dir / LOCK_FILENAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def append_action(
    run_dir: Path,
    *,
    action: ActionKind,
    factor: int | None = None,
    max_norm: float | None = None,
    target: int | None = None,
    reason: str = "",
    source: str = "human",
    to_step: int | None = None,
) -> Action:
    """Append one validated action with the next id to the run's control file, atomically.

    Raises:
        RunGone: ``run_dir`` does not exist.
        ConfigError: the action itself is invalid (bad factor, unknown undo target, ...).
        ControlFileError: the existing control file cannot be trusted; it is left untouched.
    """
    run_dir = Path(run_dir)
    try:
        kind = ActionKind(action)
    except ValueError:
        raise ConfigError(f"unknown action {action!r}") from None
    if not run_dir.is_dir():
        raise RunGone(f"{run_dir}: no such run directory")
    with _locked(run_dir):
        path = run_dir / CONTROL_FILENAME
        _remove_stale_temporaries(path)
        current = read_control(path) if os.path.lexists(path) else ControlFile(run=run_dir.name)
        new = Action(
            id=current.actions[-1].id + 1 if current.actions else 1,
            action=kind,
            factor=factor,
            max_norm=max_norm,
            target=target,
            reason=reason,
            source=source,
            issued_at=time.time(),
            to_step=to_step,
        )
        _check_new(new, current)
        doc = ControlFile(actions=(*current.actions, new), run=current.run).to_json()
        if len(json.dumps(doc, indent=1)) > MAX_CONTROL_BYTES * 0.9:
            raise ControlFileError(f"{path}: full; start a new run directory")
        write_atomic(path, doc)
    return new


def _remove_stale_temporaries(path: Path) -> None:
    """Delete temporary files of writers killed before their rename (called under the lock,
    which every writer of this file holds, so none of them is still being written)."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()


def _check_new(new: Action, current: ControlFile) -> None:
    """Validate ``new`` with the reader's own rules, plus what only makes sense when writing."""
    try:
        _parse_action(new.to_json(), list(current.actions))
    except ControlFileError as err:
        raise ConfigError(str(err)) from None
    if new.action is ActionKind.UNDO:
        if any(a.action is ActionKind.UNDO and a.target == new.target for a in current.actions):
            raise ConfigError(f"action {new.target} is already undone")
