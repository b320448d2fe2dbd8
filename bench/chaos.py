"""Kill -9 chaos suite: a real ``lrwatch serve --apply`` and a resuming trainer, killed at writes.

Run from the repository root::

    python bench/chaos.py --trials 200          # the figures in README (tens of minutes)
    python bench/chaos.py --trials 12 --seed 3  # a quick look
    python bench/chaos.py --trials 50 --mode recommend  # the daemon only recommends

A session is one training run (``tests/chaos_trainer.py``: digits MLP, SGD, checkpoint every 20
steps, ``val/loss`` through ``mon.log``) watched by ``lrwatch serve --apply`` (cooldown 20), plus
``lrwatch apply`` cuts and clips issued by the harness as a person would. Each trial picks a write
and SIGKILLs the process that makes it the moment the kernel reports it (inotify, no polling):

========== ============================================= ====================================
target     write watched                                 process killed, then restarted
========== ============================================= ====================================
control    ``lrwatch_control.json`` replaced              the daemon (it wrote the action)
audit      a decision or ack line appended to the audit   the daemon (before the hooks ran)
state      ``lrwatch_daemon/state.json`` replaced         the daemon
hookstart  the counting hook's start marker created       the daemon (a hook run in progress)
hookend    the counting hook's end marker created         the daemon (before its ``hooked`` line)
hooked     a ``hooked`` line appended to the audit        the daemon (after a hook run)
applied    ``lrwatch_applied.json`` replaced              the trainer (before its ack)
ack        the trainer's event file, after ``applied``    the trainer
ckpt       ``ckpt.pt`` replaced                           the trainer (resumes from it)
apply      a ``lrwatch apply`` temporary file created     that ``lrwatch apply``
========== ============================================= ====================================

The daemon runs two hooks on every decision: ``hooks/append-to-file``, which deduplicates on the
decision id (its file counts effects), and a counting hook written by the harness, which does
not (its marker files count runs, and check that ``LRWATCH_DECISION_ID`` equals the JSON's
``decision_id``).

At the end of a session the harness stops the trainer with a ``stop`` action (unless the daemon
already stopped the run, e.g. for overfitting; a stopped run stays stopped), lets the daemon
catch up, and checks, from the files alone:

* lost: an action issued before the trainer's last look that no event file acknowledges, or
  without exactly one ``acknowledged`` audit line; a daemon action without exactly one decision
  line; a decision with no line;
* doubled (or dropped): an LR (``lrwatch/lr``) at any step of any event file other than the
  trainer's base LR divided by the cuts in force (acknowledged in that file up to that step, or
  in any earlier process of the run): an action applied twice shows as a second division, one
  forgotten after a resume as a missing one; a decision line written twice;
* hooks: per decision line and hook, exactly one ``hooked`` line that says ok (none: lost, two:
  doubled); the counting hook run to its end at least once (else lost); append-to-file's line
  exactly once (effects lost or doubled); a second run of the counting hook is counted as a
  *rerun*, and is doubled unless a daemon kill fell between the decision line and that hook's
  ``hooked`` line (the one window where at-least-once must run a hook again);
* hung: a process that did not finish within its timeout (its stacks are dumped through
  ``faulthandler`` with SIGABRT and printed).

Exit status 1 if anything was lost, doubled or hung.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import json
import math
import os
import random
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lrwatch import schema
from lrwatch.control import read_control
from lrwatch.daemon.outputs import read_audit
from lrwatch.events.reader import EventFileReader

REPO = Path(__file__).resolve().parents[1]
AUDIT = "lrwatch_audit.jsonl"
TRAINER = REPO / "tests" / "chaos_trainer.py"
HOOK = REPO / "hooks" / "append-to-file"
BASE_LR = 0.5
STEPS = 100_000  # the trainer runs until the harness stops it
TARGETS = (
    "control", "audit", "state", "hookstart", "applied", "hookend", "ack", "ckpt", "hooked", "apply"
)  # fmt: skip
DAEMON_TARGETS = ("control", "audit", "state", "hookstart", "hookend", "hooked")
# The counting hook: a marker file when it starts and one when it ends, 0.2 s apart, so a kill
# aimed at its start lands while it runs. Not idempotent on purpose: it counts every run.
# The daemon decides every few seconds, so kills can be aimed at its decisions and their hooks:
# a short cooldown, a plateau after two flat checks, no stop for the cut budget or overfitting
# (a stopped run would end the session's trials).
BUSY_CONFIG = """\
[policy]
cooldown_steps = 30
max_total_cut = 1e12
overfit_patience = 1000

[plateau]
patience = 2
"""
COUNTING_HOOK = """\
import json, os, pathlib, sys, time
doc = json.load(sys.stdin)
key, attempt = os.environ.get("LRWATCH_DECISION_ID"), os.environ.get("LRWATCH_HOOK_ATTEMPT")
runs = pathlib.Path(sys.argv[0]).parent / "runs"
name = f"{key}.{attempt}.{os.getpid()}"
(runs / ("start." + name)).write_text(str(time.time()))
if key != doc.get("decision_id"):
    (runs / ("bad." + name)).write_text(str(doc.get("decision_id")))
time.sleep(0.2)
(runs / ("end." + name)).write_text(str(time.time()))
"""
EVENT_TIMEOUT = 25.0  # seconds to wait for a targeted write before giving up on that trial
PROC_TIMEOUT = 120.0

IN_MODIFY, IN_CLOSE_WRITE, IN_MOVED_TO, IN_CREATE = 0x2, 0x8, 0x80, 0x100


class Inotify:
    """The kernel's file events for a few directories, read with a timeout (ctypes, no thread)."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.dirs: dict[int, Path] = {}

    def watch(self, directory: Path) -> None:
        mask = IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(directory), mask)
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {directory}")
        self.dirs[wd] = directory

    def events(self, timeout: float) -> list[tuple[int, Path]]:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return []
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return []
        out, at = [], 0
        while at + 16 <= len(data):
            wd, mask, _cookie, size = struct.unpack_from("iIII", data, at)
            name = data[at + 16 : at + 16 + size].rstrip(b"\0").decode()
            at += 16 + size
            if wd in self.dirs:
                out.append((mask, self.dirs[wd] / name))
        return out

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class Counts:
    trials: int = 0
    kills: collections.Counter[str] = field(default_factory=collections.Counter)
    missed: collections.Counter[str] = field(default_factory=collections.Counter)
    lost: list[str] = field(default_factory=list)
    doubled: list[str] = field(default_factory=list)
    hung: list[str] = field(default_factory=list)
    decisions: int = 0
    hook_runs: int = 0  # runs of the counting hook that reached their end
    reruns: int = 0  # decisions whose counting hook ran more than once
    actions: int = 0
    lr_rows: int = 0


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONFAULTHANDLER": "1", "PYTHONUNBUFFERED": "1"}


def lrwatch_cmd(*args: str) -> list[str]:
    return [sys.executable, "-X", "faulthandler", "-m", "lrwatch", *args]


class Session:
    """One training run with its daemon, under kills."""

    def __init__(
        self, root: Path, rng: random.Random, counts: Counts, *, mode: str = "apply"
    ) -> None:
        self.mode = mode
        self.logdir = root / "runs"
        self.run_dir = self.logdir / "run"
        self.run_dir.mkdir(parents=True)
        (self.run_dir / schema.DAEMON_SUBRUN).mkdir()
        self.hook_log = root / "hooks.jsonl"
        self.counter = root / "counter" / "count-runs"
        (self.counter.parent / "runs").mkdir(parents=True)
        self.counter.write_text(f"#!{sys.executable}\n{COUNTING_HOOK}")
        self.counter.chmod(0o755)
        self.config = root / "lrwatch.toml"
        self.config.write_text(BUSY_CONFIG)
        self.daemon_kills: list[float] = []  # wall times, for the rerun check
        self.rng, self.counts = rng, counts
        self.notify = Inotify()
        self.notify.watch(self.run_dir)
        self.notify.watch(self.run_dir / schema.DAEMON_SUBRUN)
        self.notify.watch(self.counter.parent / "runs")
        self.daemon = self.start_daemon()
        self.trainer = self.start_trainer()
        self.stopped = False
        self.armed = False

    # ------------------------------------------------------------------ processes
    def start_daemon(self) -> subprocess.Popen[bytes]:
        args = ["serve", str(self.logdir), "--cooldown", "20", "--budget", "100"]
        args += ["--apply"] if self.mode == "apply" else []
        args += ["--hook", str(HOOK), "--hook", str(self.counter), "--config", str(self.config)]
        return subprocess.Popen(
            lrwatch_cmd(*args),
            env={**env(), "LRWATCH_HOOK_FILE": str(self.hook_log)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def start_trainer(self) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-X", "faulthandler", str(TRAINER), str(self.run_dir), str(STEPS)]
        cmd += ["--lr", str(BASE_LR), "--val-every", "10", "--ckpt-every", "20", "--pace", "0.01"]
        return subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def human_apply(self, *, wait: bool = True) -> subprocess.Popen[bytes]:
        what = self.rng.choice([["--lr-cut", "2"], ["--clip", "5.0"]])
        proc = subprocess.Popen(
            lrwatch_cmd("apply", str(self.run_dir), *what, "--reason", "chaos harness"),
            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        if wait:
            self.finish(proc, "lrwatch apply")
        return proc

    def finish(self, proc: subprocess.Popen[bytes], name: str) -> None:
        """Wait for ``proc``; a hang dumps its stacks (faulthandler on SIGABRT) and is counted."""
        try:
            proc.wait(timeout=PROC_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            _, err = proc.communicate(timeout=30)
            self.counts.hung.append(f"{name}: {err.decode(errors='replace')[-3000:]}")

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        proc.kill()
        proc.wait(timeout=30)

    # ------------------------------------------------------------------ one trial
    def trial(self, target: str) -> None:
        self.counts.trials += 1
        if self.stopped:
            self.counts.missed[target] += 1  # a stop action ended the run: nothing to kill
            return
        if target == "apply":
            self.kill_apply()
            return
        if target == "control" and self.rng.random() < 0.5:
            self.human_apply()  # the daemon decides rarely: a human cut also rewrites the file
        if target in ("applied", "ack"):
            self.human_apply()  # something for the trainer to apply
        victim = "daemon" if target in DAEMON_TARGETS else "trainer"
        skip = self.rng.randint(0, 2)  # which occurrence: right at the first, or a later one
        if not self.wait_for(target, skip):
            self.counts.missed[target] += 1
            return
        if victim == "daemon":
            self.daemon_kills.append(time.time())
        self.kill(self.daemon if victim == "daemon" else self.trainer)
        self.counts.kills[target] += 1
        if victim == "daemon":
            self.daemon = self.start_daemon()
        else:
            self.trainer = self.start_trainer()

    def wait_for(self, target: str, skip: int) -> bool:
        deadline = time.monotonic() + EVENT_TIMEOUT
        self.armed = target != "ack"  # an ack is the trainer's first event-file write after applied
        nudge = time.monotonic() + EVENT_TIMEOUT / 2  # no daemon decision by then: a human cut
        while time.monotonic() < deadline:
            if target in ("control", "audit") and time.monotonic() > nudge:
                nudge = math.inf
                self.human_apply()
            for mask, path in self.notify.events(0.5):
                if self.is_hit(target, mask, path):
                    if skip == 0:
                        return True
                    skip -= 1
            if self.trainer.poll() is not None:
                self.stopped = True  # the daemon stopped the run (overfitting): it stays stopped
                return False
        return False

    def is_hit(self, target: str, mask: int, path: Path) -> bool:
        """Whether the file event ``(mask, path)`` is the write ``target`` aims at."""
        names = {
            "control": schema.CONTROL_FILENAME,
            "state": "state.json",
            "applied": schema.APPLIED_FILENAME,
            "ckpt": "ckpt.pt",
        }
        if target == "ack":
            if path.name == schema.APPLIED_FILENAME and mask & IN_MOVED_TO:
                self.armed = True
            return self.armed and path.name.endswith(".lrwatch") and bool(mask & IN_MODIFY)
        if target in ("hookstart", "hookend"):
            prefix = "start." if target == "hookstart" else "end."
            return bool(mask & IN_CREATE) and path.name.startswith(prefix)
        if target in ("audit", "hooked"):
            if path.name != AUDIT or not mask & IN_MODIFY:
                return False
            return (last_event(path) == "hooked") == (target == "hooked")
        return path.name == names[target] and bool(mask & (IN_MOVED_TO | IN_MODIFY))

    def kill_apply(self) -> None:
        proc = self.human_apply(wait=False)
        deadline = time.monotonic() + EVENT_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            for mask, path in self.notify.events(0.2):
                if mask & IN_CREATE and path.name.startswith(f".{schema.CONTROL_FILENAME}."):
                    self.kill(proc)
                    self.counts.kills["apply"] += 1
                    return
        self.finish(proc, "lrwatch apply")
        self.counts.missed["apply"] += 1

    # ------------------------------------------------------------------ the end and the checks
    def end(self) -> None:
        if self.trainer.poll() is not None:
            self.stopped = True
        if not self.stopped:
            self.final_stop()
        self.finish(self.trainer, "trainer")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not self.caught_up():
            time.sleep(0.2)
        self.daemon.send_signal(signal.SIGTERM)
        self.finish(self.daemon, "daemon")
        self.notify.close()
        self.check()

    def final_stop(self) -> None:
        stop = subprocess.run(
            lrwatch_cmd("apply", str(self.run_dir), "--stop", "--reason", "chaos: end"),
            env=env(), capture_output=True, timeout=PROC_TIMEOUT, check=False,
        )  # fmt: skip
        if stop.returncode != 0:
            self.counts.lost.append(f"final stop refused: {stop.stderr.decode()[-300:]}")

    def caught_up(self) -> bool:
        acked = {i for f in self.event_files() for _, i in acks_in(f)}
        audit = read_audit(self.run_dir)
        decisions = [r for r in audit if r["event"] == "decision"]
        owed = {(r["decision_id"], hook) for r in decisions for hook in r["hooks"]}
        ok = [r for r in audit if r["event"] == "hooked" and r["ok"]]
        closed = {(r["decision_id"], r["hook"]) for r in ok}
        ack_lines = {r["action_id"] for r in audit if r["event"] == "acknowledged"}
        return acked <= ack_lines and owed <= closed

    def event_files(self) -> list[Path]:
        return sorted(self.run_dir.glob("events.out.tfevents.*.lrwatch"))

    def check(self) -> None:
        actions = read_control(self.run_dir / schema.CONTROL_FILENAME).actions
        self.counts.actions += len(actions)
        audit = read_audit(self.run_dir)
        self.check_lost(actions, audit)
        self.check_doubled(actions, audit)

    def check_lost(self, actions: Any, audit: list[dict[str, Any]]) -> None:
        acked = collections.Counter(i for f in self.event_files() for _, i in acks_in(f))
        ack_lines = collections.Counter(
            r["action_id"] for r in audit if r["event"] == "acknowledged"
        )
        lines = collections.Counter(
            r["action_id"] for r in audit if r["event"] == "decision" and r["action_id"]
        )
        stops = [a.id for a in actions if a.action is schema.ActionKind.STOP and a.id in acked]
        for a in actions:
            if a.action is schema.ActionKind.UNDO or (stops and a.id > min(stops)):
                continue  # nothing is applied after a stop: such an action is not lost
            if a.id not in acked:
                self.counts.lost.append(f"action {a.id} ({a.action.value}) never acknowledged")
            if ack_lines[a.id] != 1:
                self.counts.lost.append(f"action {a.id}: {ack_lines[a.id]} ack lines")
            if a.source == "daemon" and lines[a.id] != 1:
                self.counts.lost.append(f"daemon action {a.id}: {lines[a.id]} decision lines")
        decided = collections.Counter(
            (r["step"], r["action"], r["reason"]) for r in audit if r["event"] == "decision"
        )
        for key, n in decided.items():
            if n != 1:
                self.counts.doubled.append(f"decision line written {n} times: {key[:2]}")
        self.check_hooks(audit)

    def check_hooks(self, audit: list[dict[str, Any]]) -> None:
        """Every decision line's hooks: closed once, run at least once, took effect once."""
        ok_lines = collections.Counter(
            (r["decision_id"], r["hook"]) for r in audit if r["event"] == "hooked" and r["ok"]
        )
        closed_at = {
            (r["decision_id"], r["hook"]): r["wall_time"]
            for r in reversed(audit) if r["event"] == "hooked" and r["ok"]
        }  # fmt: skip
        effects = collections.Counter()
        if self.hook_log.exists():
            effects.update(
                json.loads(x)["decision_id"] for x in self.hook_log.read_text().splitlines()
            )
        starts, ends, bad = marker_times(self.counter.parent / "runs")
        self.counts.hook_runs += sum(len(v) for v in ends.values())
        for r in (r for r in audit if r["event"] == "decision"):
            self.counts.decisions += 1
            did = r["decision_id"]
            for hook in (str(HOOK), str(self.counter)):
                if ok_lines[(did, hook)] != 1:
                    where = self.counts.lost if ok_lines[(did, hook)] == 0 else self.counts.doubled
                    where.append(f"{did} {Path(hook).name}: {ok_lines[(did, hook)]} ok lines")
            if effects[did] != 1:
                where = self.counts.lost if effects[did] == 0 else self.counts.doubled
                where.append(f"{did}: append-to-file wrote it {effects[did]} times")
            if not ends.get(did):
                self.counts.lost.append(f"{did}: the counting hook never ran to its end")
            if did in bad:
                self.counts.lost.append(f"{did}: LRWATCH_DECISION_ID differs from the JSON")
            if len(starts.get(did, ())) > 1:
                self.counts.reruns += 1
                # A hook can start only after its decision line: a kill between that line and
                # the hook's ok line is the window where at-least-once reruns it.
                opened, closed = r["wall_time"], closed_at.get((did, str(self.counter)), math.inf)
                if not any(opened <= k <= closed for k in self.daemon_kills):
                    self.counts.doubled.append(f"{did}: counting hook rerun with no kill mid-run")

    def check_doubled(self, actions: Any, audit: list[dict[str, Any]]) -> None:
        by_id = {a.id: a for a in actions}
        before: set[int] = set()  # applied by earlier processes: in force from a resume on
        for path in self.event_files():
            lrs = lrs_in(path)
            self.counts.lr_rows += len(lrs)
            pairs = acks_in(path)
            first = min((s for s, _ in pairs), default=None)
            for step, lr in sorted(lrs.items()):
                in_force = before | {i for s, i in pairs if s <= step}
                expected = BASE_LR / cut_factor(in_force, by_id)
                if not math.isclose(lr, expected, rel_tol=1e-5):
                    self.counts.doubled.append(
                        f"{path.name} step {step}: lr {lr:.6g}, expected {expected:.6g} "
                        f"(acks {sorted(pairs)[:6]}, first {first})"
                    )
                    break
            before |= {i for _, i in pairs}


def last_event(path: Path) -> str | None:
    """The ``event`` of the last whole line of an audit log (read from its end)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 65536))
            lines = f.read().split(b"\n")
        return str(json.loads(lines[-2])["event"]) if len(lines) >= 2 else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def marker_times(
    folder: Path,
) -> tuple[dict[str, list[float]], dict[str, list[float]], set[str]]:
    """The counting hook's start and end times by decision id, and the ids it saw mismatched."""
    starts: dict[str, list[float]] = collections.defaultdict(list)
    ends: dict[str, list[float]] = collections.defaultdict(list)
    bad = set()
    for path in folder.iterdir():
        kind, did = path.name.split(".")[:2]
        if kind == "bad":
            bad.add(did)
        else:
            (starts if kind == "start" else ends)[did].append(float(path.read_text() or 0))
    return starts, ends, bad


def acks_in(path: Path) -> list[tuple[int, int]]:
    """(step, action id) of every ack record of one event file, in file order."""
    return [
        (s.step, int(s.value))
        for s in EventFileReader(path).read_all()
        if s.tag == schema.CONTROL_ACK and math.isfinite(s.value)
    ]


def lrs_in(path: Path) -> dict[int, float]:
    """The effective LR of each step of one event file."""
    return {s.step: s.value for s in EventFileReader(path).read_all() if s.tag == schema.LR}


def cut_factor(ids: set[int], by_id: dict[int, Any]) -> float:
    """Cumulative LR divisor of the cuts among ``ids`` that no undo among them cancelled."""
    undone = {by_id[i].target for i in ids if i in by_id and by_id[i].action.value == "undo"}
    factor = 1.0
    for i in ids:
        a = by_id.get(i)
        if a is not None and a.action is schema.ActionKind.LR_CUT and i not in undone:
            factor *= a.factor
    return factor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--per-session", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument(
        "--mode", choices=["apply", "recommend"], default="apply",
        help="the daemon's mode (recommend: its decisions are lines and hook runs only)",
    )  # fmt: skip
    args = parser.parse_args()
    rng = random.Random(args.seed)
    targets = args.targets.split(",")
    counts = Counts()
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lrwatch-chaos-") as tmp:
        session_no = 0
        while counts.trials < args.trials:
            session_no += 1
            session = Session(Path(tmp) / f"s{session_no}", rng, counts, mode=args.mode)
            try:
                for i in range(min(args.per_session, args.trials - counts.trials)):
                    session.trial(targets[(session_no + i) % len(targets)])
            finally:
                session.end()
            print(
                f"session {session_no}: {counts.trials} trials, kills {dict(counts.kills)}, "
                f"lost {len(counts.lost)}, doubled {len(counts.doubled)}, "
                f"hung {len(counts.hung)}",
                flush=True,
            )
    report(counts, time.monotonic() - start)
    raise SystemExit(1 if counts.lost or counts.doubled or counts.hung else 0)


def report(counts: Counts, seconds: float) -> None:
    print(f"trials {counts.trials}, SIGKILLs {sum(counts.kills.values())} {dict(counts.kills)}")
    print(f"targeted write not seen in time (no kill): {dict(counts.missed)}")
    print(f"actions {counts.actions}, LR rows checked {counts.lr_rows}")
    print(f"lost {len(counts.lost)}, doubled {len(counts.doubled)}, hung {len(counts.hung)}")
    print(
        f"decisions {counts.decisions}, counting-hook runs {counts.hook_runs}, decisions whose "
        f"hook ran again after a daemon kill mid-run {counts.reruns}"
    )
    print(f"{seconds:.0f} s")
    for kind, items in (("LOST", counts.lost), ("DOUBLED", counts.doubled), ("HUNG", counts.hung)):
        for item in items[:10]:
            print(f"  {kind}: {item}")


if __name__ == "__main__":
    main()
