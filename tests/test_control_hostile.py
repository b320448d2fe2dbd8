"""Issue 9: a hostile control file is refused, never thrown, and never blocks or suspends a cut.

The oracle for the LR actually used is the parameter update of plain SGD (``-lr * grad``), as in
``test_control.py``; the oracle for "refused" is the exception type.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lrwatch.cli import main
from lrwatch.control import MAX_CONTROL_BYTES, append_action, parse_control, read_control
from lrwatch.errors import ControlFileError
from lrwatch.hook.controller import Controller
from lrwatch.schema import CONTROL_FILENAME, ActionKind

REPO = Path(__file__).resolve().parents[1]
GRAD = torch.tensor([1.0, 2.0, -3.0], dtype=torch.float64)
HUGE = 10**400  # a valid JSON integer that float() refuses with OverflowError
CUT = {"id": 1, "action": "lr_cut", "factor": 10, "issued_at": 1.0}


def doc(*actions: dict[str, Any]) -> dict[str, Any]:
    return {"version": 1, "run": "r", "actions": list(actions)}


HOSTILE_BYTES = {
    "400-digit issued_at": json.dumps(doc({**CUT, "issued_at": HUGE})).encode(),
    "400-digit max_norm": json.dumps(
        doc(CUT, {"id": 2, "action": "clip", "max_norm": HUGE})
    ).encode(),
    "negative 400-digit": json.dumps(doc({**CUT, "issued_at": -HUGE})).encode(),
    "400-digit id": json.dumps(doc({**CUT, "id": HUGE})).encode(),
    "400-digit undo target": json.dumps(
        doc(CUT, {"id": 2, "action": "undo", "target": HUGE})
    ).encode(),
    "5000-digit integer": b'{"version": 1, "actions": [], "x": ' + b"9" * 5000 + b"}",
    "1e400": json.dumps(doc(CUT)).replace('"issued_at": 1.0', '"issued_at": 1e400').encode(),
    "deep nesting": b'{"version": 1, "actions": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "nesting near the limit": b'{"version": 1, "actions": [' + b"[" * 900 + b"]" * 900 + b"]}",
    "utf-8 bom": b"\xef\xbb\xbf" + json.dumps(doc(CUT)).encode(),
    "utf-16": json.dumps(doc(CUT)).encode("utf-16"),
    "latin-1 reason": json.dumps(doc({**CUT, "reason": "é"}), ensure_ascii=False).encode("latin-1"),
    "lone surrogate": json.dumps(doc({**CUT, "reason": "\ud800"})).encode(),
    "NaN": json.dumps(doc({**CUT, "issued_at": float("nan")})).encode(),
    "huge file": b'{"version": 1, "actions": [], "pad": "' + b"x" * MAX_CONTROL_BYTES + b'"}',
    "id as float": json.dumps(doc({**CUT, "id": 1.0})).encode(),
    "factor as bool": json.dumps(doc({**CUT, "factor": True})).encode(),
    "actions as dict": json.dumps({"version": 1, "actions": {"0": CUT}}).encode(),
    "top level list": b"[1, 2]",
    "version as string": json.dumps({**doc(CUT), "version": "1"}).encode(),
    "nul bytes": b"\x00" * 100,
    "empty": b"",
}


@pytest.mark.parametrize("raw", HOSTILE_BYTES.values(), ids=HOSTILE_BYTES.keys())
def test_read_control_refuses_hostile_bytes_with_control_file_error(
    tmp_path: Path, raw: bytes
) -> None:
    path = tmp_path / CONTROL_FILENAME
    path.write_bytes(raw)
    with pytest.raises(ControlFileError):
        read_control(path)


def test_read_control_refuses_a_huge_integer_in_a_message_without_echoing_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / CONTROL_FILENAME
    path.write_bytes(HOSTILE_BYTES["400-digit id"])
    with pytest.raises(ControlFileError) as err:
        read_control(path)
    assert len(str(err.value)) < 300


# --------------------------------------------------------------------------------- property
def valid_action(i: int) -> st.SearchStrategy[dict[str, Any]]:
    kinds = st.sampled_from(
        [
            {"action": "lr_cut", "factor": 2},
            {"action": "clip", "max_norm": 1.5},
            {"action": "stop"},
            {"action": "rollback", "to_step": 100},
        ]
    )
    return kinds.map(lambda k: {"id": i, "issued_at": 1.0, "reason": "r", **k})


JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**420), max_value=10**420)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
)
ANY_JSON = st.recursive(
    JSON_LEAVES,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=12,
)
KEYS = ["version", "run", "actions", "id", "action", "factor", "max_norm", "target", "to_step",
        "reason", "source", "issued_at"]  # fmt: skip


@st.composite
def mutated_documents(draw: st.DrawFn) -> Any:
    """A valid control document with a few values replaced by arbitrary JSON values."""
    n = draw(st.integers(min_value=0, max_value=3))
    actions = [draw(valid_action(i + 1)) for i in range(n)]
    document: dict[str, Any] = doc(*actions)
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        key = draw(st.sampled_from(KEYS))
        target = document
        if actions and key not in ("version", "run", "actions"):
            target = draw(st.sampled_from(actions))
        target[key] = draw(ANY_JSON)
    return document


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_documents())
def test_parse_control_accepts_or_refuses_every_mutated_document(document: Any) -> None:
    try:
        parsed = parse_control(document)
    except ControlFileError:
        return
    text = json.dumps(parsed.to_json(), allow_nan=False)  # what was accepted can be written back
    assert parse_control(json.loads(text)) == parsed


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200) | mutated_documents().map(lambda d: json.dumps(d).encode()))
def test_read_control_accepts_or_refuses_every_byte_string(
    tmp_path_factory: Any, raw: bytes
) -> None:
    path = tmp_path_factory.mktemp("c") / CONTROL_FILENAME
    path.write_bytes(raw)
    try:
        read_control(path)
    except ControlFileError:
        pass


# ------------------------------------------------------------------- the cut stays in force
def sgd_step_lr(opt: torch.optim.SGD, ctl: Controller, step: int) -> float:
    p = opt.param_groups[0]["params"][0]
    p.grad = GRAD.clone()
    before = p.detach().clone()
    ctl.before_step(opt, step)
    opt.step()
    ctl.after_step(opt)
    return float(((before - p.detach()) / GRAD).mean())


@pytest.mark.parametrize("name", ["400-digit issued_at", "400-digit max_norm", "deep nesting"])
def test_a_refused_reread_keeps_the_cut_in_force(tmp_path: Path, name: str) -> None:
    append_action(tmp_path, action=ActionKind.LR_CUT, factor=10)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(3, dtype=torch.float64))], lr=0.4)
    ctl = Controller(tmp_path, check_every=1)
    assert sgd_step_lr(opt, ctl, 0) == pytest.approx(0.04)
    (tmp_path / CONTROL_FILENAME).write_bytes(HOSTILE_BYTES[name])
    used = [sgd_step_lr(opt, ctl, step) for step in range(1, 6)]
    assert used == pytest.approx([0.04] * 5)
    assert opt.param_groups[0]["lr"] == 0.4  # the scheduler's own value, put back


def test_apply_on_a_hostile_file_prints_one_line_and_no_traceback(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path)) as w:  # `apply` needs a run: a directory with events
        w.add_scalar("loss", 1.0, 0)
    (tmp_path / CONTROL_FILENAME).write_bytes(HOSTILE_BYTES["400-digit issued_at"])
    result = CliRunner().invoke(main, ["apply", str(tmp_path), "--stop"])
    assert result.exit_code == 1
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


# --------------------------------------------------------------- FIFO, socket, device, symlink
READ_ONCE = """
import sys
from pathlib import Path
from lrwatch.control import read_control
from lrwatch.errors import ControlFileError
try:
    read_control(Path(sys.argv[1]))
except ControlFileError as err:
    print("refused:", err)
"""


def read_in_subprocess(path: Path) -> str:
    """read_control in a child with a timeout: a blocking open fails the test instead of hanging."""
    try:
        out = subprocess.run(
            [sys.executable, "-c", READ_ONCE, str(path)],
            capture_output=True, text=True, timeout=20, check=True,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(f"read_control blocked on {path}")
    return out.stdout


@pytest.mark.slow
def test_read_control_refuses_a_fifo_without_blocking(tmp_path: Path) -> None:
    path = tmp_path / CONTROL_FILENAME
    os.mkfifo(path)
    assert "not a regular file" in read_in_subprocess(path)


@pytest.mark.slow
def test_read_control_refuses_a_socket_a_device_and_a_symlink(tmp_path: Path) -> None:
    sock_path = tmp_path / "sock" / CONTROL_FILENAME
    sock_path.parent.mkdir()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        assert "refused" in read_in_subprocess(sock_path)
    dev = tmp_path / "dev" / CONTROL_FILENAME
    dev.parent.mkdir()
    dev.symlink_to("/dev/zero")
    assert "symlink" in read_in_subprocess(dev)
    with pytest.raises(ControlFileError, match="not a regular file"):
        read_control(Path("/dev/zero"))


def test_controller_does_not_block_when_a_fifo_is_swapped_in_after_a_stat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race of defect 5, made deterministic: every lstat of the control file sees a real
    regular file, and a real FIFO takes its place right after (before any open)."""
    append_action(tmp_path, action=ActionKind.LR_CUT, factor=10)
    path = tmp_path / CONTROL_FILENAME
    regular = path.read_bytes()
    real_lstat = os.lstat

    def lstat_then_swap(p: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if Path(p) != path:
            return real_lstat(p, *args, **kwargs)
        (tmp_path / "regular").write_bytes(regular)
        os.replace(tmp_path / "regular", path)
        result = real_lstat(p, *args, **kwargs)
        os.mkfifo(tmp_path / "fifo")
        os.replace(tmp_path / "fifo", path)
        return result

    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(3, dtype=torch.float64))], lr=0.4)
    ctl = Controller(tmp_path, check_every=1)
    used: list[float] = []
    worker = threading.Thread(target=lambda: used.append(sgd_step_lr(opt, ctl, 0)), daemon=True)
    monkeypatch.setattr(os, "lstat", lstat_then_swap)
    worker.start()
    worker.join(timeout=20)
    monkeypatch.undo()
    if worker.is_alive():
        with open(path, "wb"):  # a writer releases the blocked open, so the thread can end
            pass
        worker.join(timeout=5)
        pytest.fail("the training step blocked in the control-file reader")
    assert used == pytest.approx([0.4])  # the FIFO was refused: nothing applied, nothing blocked


# ------------------------------------------------------------------------------- the daemon
def test_the_daemon_records_its_decision_when_the_control_file_is_hostile(tmp_path: Path) -> None:
    from test_serve import RAILS, LossAbove, losses, write

    from lrwatch.daemon.outputs import read_audit
    from lrwatch.daemon.watched_run import WatchedRun, run_once

    (tmp_path / CONTROL_FILENAME).write_bytes(HOSTILE_BYTES["400-digit issued_at"])
    write(tmp_path, losses((1, 2.0)))
    run = WatchedRun(tmp_path, analyzer_factory=LossAbove, mode="apply")
    assert [d.step for d in run_once(run, rails=RAILS)] == [1]
    (tmp_path / CONTROL_FILENAME).unlink()  # a person removes the bad file
    write(tmp_path, losses((2, 3.0)))
    assert [d.step for d in run_once(run, rails=RAILS)] == [2]
    run.close()
    audit = [(r["step"], r["action_id"], r["held_back"] or "") for r in read_audit(tmp_path)]
    assert [(step, action_id) for step, action_id, _ in audit] == [(1, None), (2, 1)]
    assert "control file" in audit[0][2]
