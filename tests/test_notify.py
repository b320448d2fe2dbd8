"""Hook executables run with the decision on stdin, bounded in time, off the daemon's loop."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
from waiting import wait_for

from lrwatch.daemon.notify import HookResult, HookRunner, run_hook, validate_hooks
from lrwatch.errors import ConfigError

RECORD = {"version": 1, "step": 7, "action": "lr_cut", "factor": 2, "reason": "$(touch pwned)"}


def make_hook(tmp_path: Path, name: str, body: str) -> Path:
    """A real executable: a Python script with a shebang, like the ones users pass."""
    path = tmp_path / name
    path.write_text(f"#!{sys.executable}\nimport os, sys, time, subprocess\n{body}\n")
    path.chmod(0o755)
    return path


def is_gone(pid: int) -> bool:
    """True when the process no longer runs (a zombie awaiting its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def test_validate_hooks_should_resolve_executables_and_refuse_the_rest(tmp_path: Path) -> None:
    good = make_hook(tmp_path, "good", "pass")
    plain = tmp_path / "plain"
    plain.write_text("not executable")
    assert validate_hooks([good]) == (good.resolve(),)
    with pytest.raises(ConfigError, match="does not exist"):
        validate_hooks([tmp_path / "missing"])
    with pytest.raises(ConfigError, match="does not exist or is not a file"):
        validate_hooks([tmp_path])
    with pytest.raises(ConfigError, match=r"not executable \(chmod \+x"):
        validate_hooks([plain])


def test_run_hook_should_pass_the_record_on_stdin_and_nothing_through_a_shell(
    tmp_path: Path,
) -> None:
    out = tmp_path / "got.json"
    hook = make_hook(
        tmp_path,
        "echo",
        f"open({str(out)!r}, 'w').write(sys.stdin.read())\nprint(sys.argv[1:], file=sys.stderr)",
    )
    payload = json.dumps(RECORD).encode()
    result = run_hook(hook, payload, timeout=30)
    assert result == HookResult(hook, 0, False, "[]\n", "")
    assert json.loads(out.read_text()) == RECORD
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_a_failing_hook_should_be_reported_with_its_stderr_and_exit_code(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hook = make_hook(tmp_path, "fail", "sys.stderr.write('boom: no route\\n'); sys.exit(3)")
    logs = caplog.at_level(logging.WARNING, logger="lrwatch.daemon.notify")
    with logs, HookRunner([hook]) as runner:
        [future] = runner.notify(RECORD)
        result = future.result(timeout=30)
    assert (result.returncode, result.timed_out, result.ok) == (3, False, False)
    assert [r.getMessage() for r in caplog.records] == [
        f"hook {hook} exited with 3; stderr: boom: no route"
    ]


def test_a_hanging_hook_should_time_out_and_its_whole_process_group_be_killed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pids = tmp_path / "pids"
    hook = make_hook(
        tmp_path,
        "hang",
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')\n"
        "time.sleep(600)",
    )
    with caplog.at_level(logging.WARNING, logger="lrwatch.daemon.notify"):
        result = run_hook(hook, b"{}", timeout=1.0, kill_after=1.0)
    assert result.timed_out and result.returncode == -15  # SIGTERM was enough
    hook_pid, child_pid = map(int, pids.read_text().split())
    wait_for(lambda: is_gone(hook_pid) and is_gone(child_pid), timeout=20.0, every=0.01)


def test_a_hook_ignoring_sigterm_should_be_killed(tmp_path: Path) -> None:
    hook = make_hook(
        tmp_path,
        "stubborn",
        "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True, file=sys.stderr)\ntime.sleep(600)",
    )
    result = run_hook(hook, b"{}", timeout=1.0, kill_after=0.5)
    assert (result.timed_out, result.returncode) == (True, -9)


def test_children_left_behind_by_a_finished_hook_should_be_killed(tmp_path: Path) -> None:
    pid_file = tmp_path / "child"
    hook = make_hook(
        tmp_path,
        "leaver",
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'],"
        " stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))",
    )
    assert run_hook(hook, b"{}", timeout=30).ok
    child_pid = int(pid_file.read_text())
    wait_for(lambda: is_gone(child_pid), timeout=20.0, every=0.01)


def test_notify_should_return_at_once_while_a_hook_hangs_and_others_still_run(
    tmp_path: Path,
) -> None:
    release = tmp_path / "release"
    out = tmp_path / "out"
    blocked = make_hook(
        tmp_path, "blocked", f"while not os.path.exists({str(release)!r}): time.sleep(0.01)"
    )
    quick = make_hook(tmp_path, "quick", f"open({str(out)!r}, 'w').write(sys.stdin.read())")
    with HookRunner([blocked, quick], timeout=60) as runner:
        slow_future, quick_future = runner.notify(RECORD)
        assert not slow_future.done()  # it cannot finish before the release file exists
        assert quick_future.result(timeout=30).ok
        assert json.loads(out.read_text()) == RECORD
        assert not slow_future.done()
        release.touch()
        assert slow_future.result(timeout=30).ok


def test_a_full_queue_should_drop_the_notification_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    release = tmp_path / "release"
    blocked = make_hook(
        tmp_path, "blocked", f"while not os.path.exists({str(release)!r}): time.sleep(0.01)"
    )
    with HookRunner([blocked], timeout=60, max_workers=1, max_pending=1) as runner:
        [running] = runner.notify(RECORD)
        wait_for(running.running, timeout=20.0, every=0.01)
        [queued] = runner.notify(RECORD)
        with caplog.at_level(logging.WARNING, logger="lrwatch.daemon.notify"):
            [dropped] = runner.notify(RECORD)
        assert dropped.cancelled()
        release.touch()
        assert running.result(timeout=30).ok and queued.result(timeout=30).ok
    assert "this one is dropped" in caplog.records[0].getMessage()


def test_a_hook_that_cannot_start_should_be_reported_and_the_runner_keep_going(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken = tmp_path / "broken"
    broken.write_text("#!/nonexistent/interpreter\n")
    broken.chmod(0o755)
    with (
        caplog.at_level(logging.WARNING, logger="lrwatch.daemon.notify"),
        HookRunner([broken], max_workers=1) as runner,
    ):
        for _ in range(2):
            [future] = runner.notify(RECORD)
            with pytest.raises(OSError):
                future.result(timeout=30)
    assert len(caplog.records) == 2 and "could not run" in caplog.records[0].getMessage()


def test_runner_should_refuse_bad_settings() -> None:
    with pytest.raises(ConfigError, match="positive"):
        HookRunner([], timeout=0)
    with pytest.raises(ConfigError, match="at least 1"):
        HookRunner([], max_workers=0)
    assert HookRunner([]).notify(RECORD) == []  # no hooks: no threads, nothing to do


def test_submit_should_pass_env_and_report_every_end_to_done_even_a_failed_start(
    tmp_path: Path,
) -> None:
    seen = tmp_path / "seen"
    hook = make_hook(tmp_path, "env", f"open({str(seen)!r}, 'w').write(os.environ['KEY'])")
    broken = tmp_path / "broken"
    broken.write_text("#!/nonexistent/interpreter\n")
    broken.chmod(0o755)
    ended: list[HookResult] = []
    with HookRunner([hook, broken], max_workers=1) as runner:
        runner.submit(hook, b"{}", env={"KEY": "60-abc"}, done=ended.append).result(timeout=30)
        with pytest.raises(OSError):
            runner.submit(broken, b"{}", done=ended.append).result(timeout=30)
    assert seen.read_text() == "60-abc"
    assert [(r.hook, r.ok, r.returncode) for r in ended] == [(hook, True, 0), (broken, False, None)]
    assert "No such file" in ended[1].stderr
