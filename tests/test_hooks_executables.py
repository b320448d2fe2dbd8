"""The shipped hooks/ executables, run for real with a decision record piped into them."""

from __future__ import annotations

import dataclasses
import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lrwatch.daemon.outputs import decision_record
from lrwatch.schema import ActionKind, Decision, Finding, Kind, Severity

HOOKS = Path(__file__).resolve().parent.parent / "hooks"

DECISION = Decision(
    step=120,
    action=ActionKind.LR_CUT,
    factor=5,
    reason="explosion: grad norm 40x its median; $(touch pwned); `id`",
    findings=(Finding(Kind.EXPLOSION, 118, "lrwatch/grad_norm", Severity.CRITICAL, {"x": 40.0}),),
)
RECORD = decision_record(DECISION, run="runs/exp1", mode="apply", action_id=4, wall_time=1e9)
OTHER = decision_record(
    dataclasses.replace(DECISION, step=121),
    run="runs/exp1",
    mode="apply",
    action_id=5,
    wall_time=1e9,
)


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    """A PATH holding only python3, so `#!/usr/bin/env python3` works and nothing else is found."""
    path = tmp_path / "bin"
    path.mkdir()
    (path / "python3").symlink_to(sys.executable)
    return path


def run(
    name: str, stdin: str, *, env: dict[str, str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(HOOKS / name)],
        input=stdin,
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("name", ["notify-desktop", "webhook", "append-to-file"])
def test_each_hook_should_be_a_documented_stdlib_executable(name: str) -> None:
    path = HOOKS / name
    text = path.read_text()
    assert os.access(path, os.X_OK)
    assert text.startswith('#!/usr/bin/env python3\n"""')
    imports = {
        line.split()[1].split(".")[0]
        for line in text.splitlines()
        if line.startswith(("import ", "from "))
    }
    assert imports <= set(sys.stdlib_module_names) | {"__future__"}


@pytest.mark.parametrize("name", ["notify-desktop", "webhook", "append-to-file"])
def test_each_hook_should_exit_non_zero_on_input_that_is_not_a_decision(
    name: str, bin_dir: Path, tmp_path: Path
) -> None:
    env = {"PATH": str(bin_dir), "LRWATCH_WEBHOOK_URL": "http://127.0.0.1:9/"}
    result = run(name, "not json", env=env, cwd=tmp_path)
    assert result.returncode == 1 and name in result.stderr


def test_notify_desktop_without_notify_send_should_print_one_line(
    bin_dir: Path, tmp_path: Path
) -> None:
    result = run("notify-desktop", json.dumps(RECORD), env={"PATH": str(bin_dir)}, cwd=tmp_path)
    assert result.returncode == 0
    assert result.stderr == (
        f"lrwatch: lr_cut /5 (applied) at step 120 | runs/exp1 | {DECISION.reason}\n"
    )


def test_notify_desktop_should_pass_the_text_to_notify_send_as_argv(
    bin_dir: Path, tmp_path: Path
) -> None:
    seen = tmp_path / "argv.json"
    fake = bin_dir / "notify-send"
    fake.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"open({str(seen)!r}, 'w').write(json.dumps(sys.argv[1:]))\n"
    )
    fake.chmod(0o755)
    result = run("notify-desktop", json.dumps(RECORD), env={"PATH": str(bin_dir)}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(seen.read_text()) == [
        "--app-name=lrwatch",
        "--urgency=critical",
        "--",
        "lrwatch: lr_cut /5 (applied) at step 120",
        f"runs/exp1\n{DECISION.reason}",
    ]
    assert not (tmp_path / "pwned").exists()


class _Recorder(http.server.BaseHTTPRequestHandler):
    status = 200
    bodies: list[dict[str, Any]] = []
    keys: list[str | None] = []

    def do_POST(self) -> None:  # noqa: N802 (the http.server protocol)
        length = int(self.headers["Content-Length"])
        type(self).bodies.append(json.loads(self.rfile.read(length)))
        type(self).keys.append(self.headers["Idempotency-Key"])
        self.send_response(self.status)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # quiet test output
        pass


@pytest.fixture
def server() -> Iterator[http.server.HTTPServer]:
    _Recorder.bodies = []
    _Recorder.keys = []
    srv = http.server.HTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=srv.serve_forever, name="test-webhook-server")
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=10)


def test_webhook_should_post_slack_compatible_json(
    server: http.server.HTTPServer, bin_dir: Path, tmp_path: Path
) -> None:
    url = f"http://127.0.0.1:{server.server_address[1]}/hooks/T000"
    env = {"PATH": str(bin_dir), "LRWATCH_WEBHOOK_URL": url}
    result = run("webhook", json.dumps(RECORD), env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [body] = _Recorder.bodies
    assert body["text"] == (
        f"lrwatch runs/exp1 step 120: lr_cut /5 applied as #4: {DECISION.reason}"
    )
    assert body["lrwatch"] == RECORD
    assert _Recorder.keys == [RECORD["decision_id"]]


def test_webhook_with_a_sent_dir_should_post_each_decision_once(
    server: http.server.HTTPServer, bin_dir: Path, tmp_path: Path
) -> None:
    """lrwatch may run a hook twice for a decision (a kill mid-run): the marker skips it."""
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    sent = tmp_path / "sent"
    sent.mkdir()
    env = {"PATH": str(bin_dir), "LRWATCH_WEBHOOK_URL": url, "LRWATCH_WEBHOOK_SENT_DIR": str(sent)}
    for record in (RECORD, OTHER, RECORD):
        keyed = {**env, "LRWATCH_DECISION_ID": record["decision_id"]}
        assert run("webhook", json.dumps(record), env=keyed, cwd=tmp_path).returncode == 0
    assert [b["lrwatch"]["step"] for b in _Recorder.bodies] == [120, 121]
    assert sorted(p.name for p in sent.iterdir()) == sorted(
        [RECORD["decision_id"], OTHER["decision_id"]]
    )


@pytest.mark.parametrize("failure", ["http-500", "refused", "no-url"])
def test_webhook_should_exit_non_zero_when_the_post_fails(
    failure: str,
    server: http.server.HTTPServer,
    bin_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_Recorder, "status", 500)
    port = server.server_address[1]
    url = {"http-500": f"http://127.0.0.1:{port}/", "refused": "http://127.0.0.1:9/", "no-url": ""}[
        failure
    ]
    env = {"PATH": str(bin_dir), "LRWATCH_WEBHOOK_URL": url}
    result = run("webhook", json.dumps(RECORD), env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("webhook: ")


def test_append_to_file_should_append_one_json_line_per_decision(
    bin_dir: Path, tmp_path: Path
) -> None:
    """Run again for a decision already in the file (lrwatch reruns a hook after a kill), it
    appends nothing; the id comes from LRWATCH_DECISION_ID, else from the JSON."""
    target = tmp_path / "log" / "decisions.jsonl"
    target.parent.mkdir()
    env = {"PATH": str(bin_dir), "LRWATCH_HOOK_FILE": str(target)}
    runs = [(RECORD, {}), (OTHER, {}), (RECORD, {"LRWATCH_DECISION_ID": RECORD["decision_id"]})]
    for record, key in runs:
        done = run("append-to-file", json.dumps(record), env={**env, **key}, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    assert [json.loads(line) for line in target.read_text().splitlines()] == [RECORD, OTHER]
    assert "already in" in done.stderr


def test_append_to_file_should_default_to_a_file_in_the_working_directory(
    bin_dir: Path, tmp_path: Path
) -> None:
    result = run("append-to-file", json.dumps(RECORD), env={"PATH": str(bin_dir)}, cwd=tmp_path)
    assert result.returncode == 0
    lines = (tmp_path / "lrwatch-decisions.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [RECORD]


def test_append_to_file_should_fail_when_the_file_cannot_be_written(
    bin_dir: Path, tmp_path: Path
) -> None:
    env = {"PATH": str(bin_dir), "LRWATCH_HOOK_FILE": str(tmp_path / "missing" / "x.jsonl")}
    result = run("append-to-file", json.dumps(RECORD), env=env, cwd=tmp_path)
    assert result.returncode == 1 and "cannot append" in result.stderr
