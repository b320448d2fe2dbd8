"""Issue 9: hook runs as durable jobs: every decision's hooks run, across kills of the daemon.

The kill tests run the real ``lrwatch serve --once`` on real event files with a hook that
SIGKILLs its parent, the daemon, on its first run: before starting its work (the daemon dies with
the decision line written and the hook not done) or after it (done, no ``hooked`` line yet).
A second ``serve --once`` must then run every hook that was owed, with the same decision id, so
an idempotent hook takes effect exactly once.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
from test_serve import RAILS, LossAbove, diverging, losses, lrwatch_cmd, watched, write

from lrwatch.daemon.notify import HookRunner
from lrwatch.daemon.outputs import read_audit
from lrwatch.daemon.serve import Daemon
from lrwatch.daemon.watched_run import WatchedRun, run_once
from lrwatch.schema import Decision, Scalar

# A hook that records every run and, idempotently, its effect (one line per decision id); on
# its first run ever it SIGKILLs the daemon that started it, before or after that effect.
KILLER_HOOK = """\
import json, os, pathlib, signal, sys
doc = json.load(sys.stdin)
key = os.environ.get("LRWATCH_DECISION_ID")
here = pathlib.Path(sys.argv[0]).parent
with open(here / "runs.jsonl", "a") as f:
    f.write(json.dumps({"key": key, "doc_key": doc.get("decision_id"), "step": doc["step"],
                        "attempt": os.environ.get("LRWATCH_HOOK_ATTEMPT")}) + "\\n")
try:  # the first run of all, even with two hooks running at once
    os.close(os.open(here / "killed", os.O_CREAT | os.O_EXCL))
    first = True
except FileExistsError:
    first = False
if first and KILL == "before":
    os.kill(os.getppid(), signal.SIGKILL)
    sys.exit(0)
effects = here / "effects.jsonl"
done = effects.read_text().splitlines() if effects.exists() else []
if key not in done:
    with open(effects, "a") as f:
        f.write(key + "\\n")
if first and KILL == "after":
    os.kill(os.getppid(), signal.SIGKILL)
"""


def make_killer(tmp_path: Path, when: str) -> Path:
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    hook = hook_dir / "killer"
    hook.write_text(f"#!{sys.executable}\nKILL = {when!r}\n{KILLER_HOOK}")
    hook.chmod(0o755)
    return hook


def serve_once(logdir: Path, *hooks: Path, mode: str = "apply") -> subprocess.CompletedProcess[str]:
    args = ["serve", "--once"] + (["--apply"] if mode == "apply" else [])
    for hook in hooks:
        args += ["--hook", str(hook)]
    root = str(Path(__file__).resolve().parent.parent)
    return subprocess.run(
        lrwatch_cmd(*args, str(logdir)),
        env={**os.environ, "PYTHONPATH": root}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def decisions(run_dir: Path) -> list[dict[str, object]]:
    return [r for r in read_audit(run_dir) if r["event"] == "decision"]


@pytest.mark.slow
@pytest.mark.parametrize(("when", "mode"), [("before", "apply"), ("after", "recommend")])
def test_a_daemon_killed_during_a_hook_run_runs_every_owed_hook_after_a_restart(
    tmp_path: Path, when: str, mode: str
) -> None:
    logdir = tmp_path / "runs"
    diverging(logdir / "exp1")
    hook = make_killer(tmp_path, when)
    first = serve_once(logdir, hook, mode=mode)
    assert first.returncode == -signal.SIGKILL, first.stderr  # the hook killed it
    again = serve_once(logdir, hook, mode=mode)
    assert again.returncode == 0, again.stderr
    lines = decisions(logdir / "exp1")
    assert lines, "the daemon decided nothing on a diverging run"
    ids = [r["decision_id"] for r in lines]
    assert len(set(ids)) == len(ids)
    effects = collections.Counter((hook.parent / "effects.jsonl").read_text().split())
    assert effects == collections.Counter(ids)  # each decision's hook took effect once
    runs = [json.loads(x) for x in (hook.parent / "runs.jsonl").read_text().splitlines()]
    assert all(r["key"] == r["doc_key"] and r["key"] in ids for r in runs)
    killed = runs[0]["key"]
    # The run the kill interrupted ran again, with the same key and attempt number (a hook
    # running beside it on the other worker may have run twice too: it was not recorded either).
    per_key = collections.Counter(r["key"] for r in runs)
    assert per_key[killed] == 2 and set(per_key) == set(ids) and max(per_key.values()) == 2
    assert {r["attempt"] for r in runs} == {"1"}
    hooked = [r for r in read_audit(logdir / "exp1") if r["event"] == "hooked"]
    assert sorted(r["decision_id"] for r in hooked) == sorted(ids)
    assert all(r["ok"] and r["hook"] == str(hook) for r in hooked)
    third = serve_once(logdir, hook, mode=mode)  # nothing is owed any more: nothing runs
    assert third.returncode == 0, third.stderr
    assert len((hook.parent / "runs.jsonl").read_text().splitlines()) == len(runs)


# ------------------------------------------------------------------ retries, in-process passes
def script(tmp_path: Path, name: str, body: str) -> Path:
    """A hook executable that logs each run (decision id, attempt) to runs.jsonl, then ``body``."""
    hook = tmp_path / name
    hook.write_text(
        f"#!{sys.executable}\nimport json, os, sys, time\n"
        f"with open({str(tmp_path / 'runs.jsonl')!r}, 'a') as f:\n"
        "    f.write(json.dumps([os.environ['LRWATCH_DECISION_ID'],"
        " int(os.environ['LRWATCH_HOOK_ATTEMPT'])]) + '\\n')\n"
        f"{body}\n"
    )
    hook.chmod(0o755)
    return hook


def hook_runs(tmp_path: Path) -> list[tuple[str, int]]:
    path = tmp_path / "runs.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [tuple(json.loads(x)) for x in lines]  # type: ignore[misc]


def hooked(run_dir: Path) -> list[tuple[int, bool, int | None, bool]]:
    lines = [r for r in read_audit(run_dir) if r["event"] == "hooked"]
    return [(r["attempt"], r["ok"], r["returncode"], r["timed_out"]) for r in lines]


def passes_until(run: WatchedRun, runner: HookRunner, done: Callable[[], bool]) -> None:
    """Daemon passes (as the watch loop makes them) until ``done``, within a bound."""
    deadline = time.monotonic() + 60
    while not done():
        assert time.monotonic() < deadline, "not done in time"
        run_once(run, rails=RAILS, hooks=runner)
        time.sleep(0.05)


def test_a_failing_hook_is_retried_then_given_up_and_a_restart_does_not_run_it_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    write(run_dir, losses((1, 2.0)))
    hook = script(tmp_path, "failing", "sys.exit(3)")
    with HookRunner([hook], retry_after=(0.0, 0.0)) as runner:
        run = watched(run_dir)
        passes_until(run, runner, lambda: len(hooked(run_dir)) == 3 and run.hook_jobs.idle)
        run.close()
        again = watched(run_dir)
        for _ in range(3):
            run_once(again, rails=RAILS, hooks=runner)
        again.close()
    [record] = [r for r in read_audit(run_dir) if r["event"] == "decision"]
    assert hook_runs(tmp_path) == [(record["decision_id"], n) for n in (1, 2, 3)]
    assert hooked(run_dir) == [(1, False, 3, False), (2, False, 3, False), (3, False, 3, False)]
    assert "failed 3 times" in caplog.text and "given up" in caplog.text


def test_a_hook_that_fails_once_succeeds_on_its_second_run_and_a_timeout_counts_as_failure(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    write(run_dir, losses((1, 2.0), (2, 3.0)))
    # The first run of each decision hangs past the timeout; the second one works.
    hook = script(tmp_path, "flaky", "if os.environ['LRWATCH_HOOK_ATTEMPT'] == '1': time.sleep(60)")
    with HookRunner([hook], timeout=0.5, kill_after=0.5, retry_after=(0.0,)) as runner:
        run = watched(run_dir)
        passes_until(run, runner, lambda: run.hook_jobs.idle and len(hooked(run_dir)) == 4)
        run.close()
    assert sorted(hooked(run_dir)) == [(1, False, -15, True)] * 2 + [(2, True, 0, False)] * 2
    assert sorted(n for _, n in hook_runs(tmp_path)) == [1, 1, 2, 2]


def test_a_restart_resumes_the_retries_where_the_killed_daemon_left_them(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    write(run_dir, losses((1, 2.0)))
    hook = script(tmp_path, "failing", "sys.exit(1)")
    with HookRunner([hook], retry_after=(0.0, 3600.0)) as runner:
        run = watched(run_dir)
        passes_until(run, runner, lambda: len(hooked(run_dir)) == 2)  # the 3rd waits an hour
        run.close()
    # A restarted daemon waits out the same delay from the last failure's line, then runs
    # the last attempt, numbered 3.
    with HookRunner([hook], retry_after=(0.0, 3600.0)) as runner:
        again = watched(run_dir)
        run_once(again, rails=RAILS, hooks=runner)
        assert [job.attempt for job in again.hook_jobs.jobs.values()] == [3]
        again.close()
    with HookRunner([hook], retry_after=(0.0, 0.0)) as runner:
        third = watched(run_dir)
        passes_until(third, runner, lambda: len(hooked(run_dir)) == 3)
        third.close()
    assert [n for _, n in hook_runs(tmp_path)] == [1, 2, 3]


def test_a_full_queue_delays_hook_runs_and_loses_none(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    write(run_dir, losses(*((s, 2.0) for s in range(1, 6))))
    release = tmp_path / "release"
    hook = script(tmp_path, "slow", f"while not os.path.exists({str(release)!r}): time.sleep(0.01)")
    with HookRunner([hook], timeout=60, max_workers=1, max_pending=1) as runner:
        run = watched(run_dir)
        run_once(run, rails=RAILS, hooks=runner)  # 5 decisions: 1 running, 1 queued, 3 wait
        release.touch()
        passes_until(run, runner, lambda: run.hook_jobs.idle)
        run.close()
    ids = [r["decision_id"] for r in read_audit(run_dir) if r["event"] == "decision"]
    assert sorted(i for i, _ in hook_runs(tmp_path)) == sorted(ids) and len(ids) == 5


def test_a_hook_no_longer_configured_is_not_run_for_old_decisions(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    write(run_dir, losses((1, 2.0)))
    old = script(tmp_path, "old", "sys.exit(1)")
    new = script(tmp_path, "new", "")
    with HookRunner([old]) as runner:
        run = watched(run_dir)
        run_once(run, rails=RAILS, hooks=runner)  # it fails once; then the daemon is restarted
        run.close()
    with HookRunner([new]) as runner:
        again = watched(run_dir)
        run_once(again, rails=RAILS, hooks=runner)  # "new" is not run for the old decision
        again.close()
    assert [n for _, n in hook_runs(tmp_path)] == [1] and hooked(run_dir) == [(1, False, 1, False)]
    assert "no longer configured" in caplog.text


class FailsOnce(LossAbove):
    """Raises on the first loss of 99 it sees (one bad pass), then behaves."""

    failed = False

    def feed(self, scalars: Iterable[Scalar], **how: bool) -> list[Decision]:
        scalars = list(scalars)
        if not FailsOnce.failed and any(s.value == 99.0 for s in scalars):
            FailsOnce.failed = True
            raise ValueError("one bad pass")
        return super().feed(scalars, **how)


def test_a_run_rebuilt_after_a_failed_pass_does_not_start_a_running_hook_again(
    tmp_path: Path,
) -> None:
    logdir = tmp_path / "runs"
    write(logdir / "exp", losses((1, 2.0)))
    release = tmp_path / "release"
    hook = script(tmp_path, "slow", f"while not os.path.exists({str(release)!r}): time.sleep(0.01)")
    with HookRunner([hook], timeout=60) as runner:
        daemon = Daemon(
            [logdir], mode="apply", analyzer_factory=FailsOnce, rails=RAILS, hooks=runner
        )
        daemon.process()  # a decision; its hook starts and waits for the release file
        write(logdir / "exp", losses((2, 99.0)))
        daemon.process()  # the pass fails: the run is forgotten, to be rebuilt from its state
        daemon.process()  # rebuilt: the hook still runs, the audit log has no hooked line yet
        release.touch()
        passes_until(daemon.runs[logdir / "exp"], runner, lambda: len(hooked(logdir / "exp")) == 2)
        daemon.close()
    assert sorted(n for _, n in hook_runs(tmp_path)) == [1, 1]  # one run for each of 2 decisions
