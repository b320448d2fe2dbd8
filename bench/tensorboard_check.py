"""Verify lrwatch's TensorBoard output for real: a live run, a live daemon, a real TensorBoard.

1. A tiny MLP trains with ``lrwatch.watch`` while ``lrwatch serve --apply`` watches the logdir; at
   ``--blow-at`` the LR jumps from 0.05 to ``--jump-lr``; the daemon decides, writes the control
   file, the hook applies the action (``lrwatch_control/ack``), and the daemon records decision
   texts, markers, the update-ratio band and the custom-scalars layout in ``<run>/lrwatch_daemon/``.
2. ``tensorboard --logdir`` starts on a free port; the script waits until it serves the runs.
3. Through TensorBoard's HTTP API it checks: the runs, the lrwatch scalar tags (and that the LR
   series has as many points as lrwatch's reader sees), the daemon's decision texts (one per
   audit-log decision, reason included) and the custom-scalars layout.
4. Headless Chromium renders the Time Series tab: its group order and open cards must be what
   ``tests/test_tb_timeseries.py`` derives from the served tags (headline first, the daemon's
   decisions second, per-layer sections closed); then it screenshots the scalars, custom-scalars
   and Time Series dashboards into ``bench/out/``.

Usage (about a minute on a loaded 2-core machine)::

    PYTHONPATH=. python bench/tensorboard_check.py [--steps 200] [--blow-at 90] [--jump-lr 0.5]
        [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import torch

import lrwatch
from lrwatch import schema
from lrwatch.daemon.outputs import read_audit
from lrwatch.daemon.tb_layout import layout_charts
from lrwatch.events.reader import read_run

BIN = Path(sys.executable).parent
OUT = Path(__file__).with_name("out")
CHROMIUM = "/usr/bin/chromium"
TB_TAGS = [schema.LOSS, schema.LR, schema.GRAD_NORM, schema.UPDATE_RATIO, "val/loss"]


def start_daemon(logdir: Path) -> tuple[subprocess.Popen[str], threading.Event, list[str]]:
    """``lrwatch serve --apply``; the event is set once it watches a run (from its log)."""
    cmd = [sys.executable, "-m", "lrwatch", "-v", "serve", str(logdir), "--apply", "--poll", "0.2"]
    cmd += ["--cooldown", "20"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ})
    watching, lines = threading.Event(), []

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line.rstrip())
            if "watching run" in line:
                watching.set()

    threading.Thread(target=pump, daemon=True).start()
    return proc, watching, lines


def train(
    run: Path, *, steps: int, blow_at: int, jump_lr: float, daemon_ready: threading.Event
) -> int:
    """Train; before the LR jump wait (bounded) until the daemon watches the run. Returns acks."""
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(512, 8, generator=gen)
    y = (2 * x[:, :1] - x[:, 1:2]).tanh() + 0.05 * torch.randn(512, 1, generator=gen)
    xv = torch.randn(256, 8, generator=gen)
    yv = (2 * xv[:, :1] - xv[:, 1:2]).tanh()
    loss_fn = torch.nn.MSELoss()
    with lrwatch.watch(
        model, opt, logdir=run, criterion=loss_fn, log_every=1, control_every=1
    ) as mon:
        for step in range(steps):
            if step == blow_at:
                if not daemon_ready.wait(timeout=60):
                    print("warning: the daemon never reported watching the run", file=sys.stderr)
                for group in opt.param_groups:
                    group["lr"] = jump_lr  # the update ratio, grad norm and loss jump
            if step >= blow_at:
                time.sleep(0.05)  # pacing, so the daemon (poll 0.2 s) acts while the run lives
            idx = torch.randint(0, 512, (64,), generator=gen)
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
            if step % 20 == 19:
                with torch.no_grad():
                    mon.log(**{"val/loss": loss_fn(model(xv), yv).item()})
            if mon.should_stop:
                break
    return sum(1 for s in read_run(run) if s.tag == schema.CONTROL_ACK)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(port: int, path: str, **query: str) -> Any:
    url = f"http://127.0.0.1:{port}{path}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def wait_for(what: str, check: Any, timeout: float) -> Any:
    """Poll ``check()`` until it returns something truthy; bounded, so a hang is reported."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = check()
            if got:
                return got
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"FAILED: {what} within {timeout:.0f} s")


def check_http(port: int, run: str) -> list[str]:
    """Everything verified through TensorBoard's HTTP API, as printable lines."""
    daemon_run = f"{run}/{schema.DAEMON_SUBRUN}"
    done = []
    runs = get(port, "/data/runs")
    assert run in runs and daemon_run in runs, runs
    done.append(f"/data/runs: {runs}")
    tags = get(port, "/data/plugin/scalars/tags")
    missing = [t for t in TB_TAGS if t not in tags[run]]
    assert not missing, missing
    decision = schema.DECISION_TAG_FMT.format("")
    markers = sorted(t for t in tags[daemon_run] if t.startswith(decision))
    assert markers, tags[daemon_run]
    done.append(f"scalar tags of {run}: {len(tags[run])}, including {TB_TAGS}")
    done.append(f"daemon markers in {daemon_run}: {markers}")
    return done


def check_series(port: int, run: str, run_dir: Path) -> str:
    served = get(port, "/data/plugin/scalars/scalars", run=run, tag=schema.LR)
    ours = [s for s in read_run(run_dir) if s.tag == schema.LR]
    assert len(served) == len(ours), (len(served), len(ours))
    return (
        f"{schema.LR}: {len(served)} points served = {len(ours)} read by lrwatch; "
        f"lr first {served[0][2]:.3g}, max {max(p[2] for p in served):.3g}, "
        f"last {served[-1][2]:.3g}"
    )


def check_texts(port: int, run: str, run_dir: Path) -> str:
    daemon_run = f"{run}/{schema.DAEMON_SUBRUN}"
    text_tags = get(port, "/data/plugin/text/tags")
    assert schema.DECISION_TEXT_TAG in text_tags.get(daemon_run, []), text_tags
    texts = get(port, "/data/plugin/text/text", run=daemon_run, tag=schema.DECISION_TEXT_TAG)
    decisions = [r for r in read_audit(run_dir) if r.get("event") == "decision"]
    assert len(texts) == len(decisions), (len(texts), len(decisions))
    for served, record in zip(sorted(texts, key=lambda t: t["step"]), decisions, strict=True):
        assert served["step"] == record["step"] and record["action"] in served["text"]
    steps = [t["step"] for t in texts]
    return f"decision texts: {len(texts)} served = {len(decisions)} audit decisions, steps {steps}"


def check_layout(port: int) -> str:
    layout = get(port, "/data/plugin/custom_scalars/layout")
    served = [
        (c["title"], [(ch["title"], ch["multiline"]["tag"]) for ch in c["chart"]])
        for c in layout["category"]
    ]
    assert served == layout_charts(), served
    charts = sum(len(c[1]) for c in served)
    return f"custom_scalars layout: {len(served)} categories, {charts} charts, as written"


def check_timeseries_dom(port: int, profile: Path) -> str:
    """The Time Series tab as Chromium renders it: group order and which cards are open.

    Compared with ``tests/test_tb_timeseries.py``'s port of the tab's ordering rule, applied to
    the tags TensorBoard serves: the test's assumption, checked against the real frontend.
    """
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_tb_timeseries import time_series_groups

    tags = get(port, "/data/plugin/scalars/tags")
    groups = time_series_groups({t for run_tags in tags.values() for t in run_tags})
    dom = chromium_dump(f"http://127.0.0.1:{port}/#timeseries", profile)
    names = [g for g, _ in groups]
    seen = sorted(names, key=lambda g: dom.find(f">{g}<") if f">{g}<" in dom else 10**9)
    shown = [g for g in seen if f">{g}<" in dom]
    assert shown == names, (shown, names)
    opened = [card for _, cards in groups for card in cards if card in dom]
    expected = [card for _, cards in groups[:2] for card in cards]
    assert set(expected) <= set(opened), (expected, opened)
    per_layer = [c for c in opened if c.split("/")[0] in schema.PER_TENSOR_PREFIXES.values()]
    assert not per_layer, per_layer
    return f"Time Series in Chromium: groups {names}; open: {expected}"


def chromium_dump(url: str, profile: Path) -> str:
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={profile}", "--window-size=1600,2400",
        "--virtual-time-budget=15000", "--dump-dom", url,
    ]  # fmt: skip
    return subprocess.run(cmd, check=True, capture_output=True, timeout=120, text=True).stdout


def screenshot(url: str, png: Path, profile: Path) -> None:
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={profile}", "--window-size=1600,1000",
        "--virtual-time-budget=15000", f"--screenshot={png}", url,
    ]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--blow-at", type=int, default=90)
    parser.add_argument("--jump-lr", type=float, default=0.5, help="LR from --blow-at on.")
    parser.add_argument("--keep", type=Path, help="Use this logdir and keep it.")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lrwatch_tb_"))
    logdir = args.keep or tmp / "logs"
    run_dir = logdir / "mlp_lr_jump"
    run_dir.mkdir(parents=True, exist_ok=True)
    daemon, watching, daemon_log = start_daemon(logdir)
    try:
        acks = train(
            run_dir,
            steps=args.steps,
            blow_at=args.blow_at,
            jump_lr=args.jump_lr,
            daemon_ready=watching,
        )
        wait_for("the daemon's decision", lambda: read_audit(run_dir), timeout=30)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)
    print(f"trained {args.steps} steps, {acks} action(s) acknowledged by the hook")
    print("daemon said:", *[line for line in daemon_log if "step" in line][:6], sep="\n  ")
    port = free_port()
    tb = subprocess.Popen(
        [str(BIN / "tensorboard"), "--logdir", str(logdir), "--port", str(port),
         "--host", "127.0.0.1", "--load_fast=false"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        run = run_dir.name
        started = time.monotonic()
        wait_for("TensorBoard serving the runs", lambda: run in get(port, "/data/runs"), 90)
        wait_for(
            "the daemon's texts",
            lambda: get(port, "/data/plugin/text/tags").get(f"{run}/{schema.DAEMON_SUBRUN}"),
            60,
        )
        print(
            f"tensorboard on port {port} served the runs after {time.monotonic() - started:.1f} s"
        )
        for line in [
            *check_http(port, run),
            check_series(port, run, run_dir),
            check_texts(port, run, run_dir),
            check_layout(port),
        ]:
            print("verified:", line)
        print("verified:", check_timeseries_dom(port, tmp / "chromium-dom"))
        OUT.mkdir(exist_ok=True)
        base = f"http://127.0.0.1:{port}/"
        for name, url in [
            (
                "tensorboard_scalars.png",
                base + "?tagFilter=" + urllib.parse.quote("^lrwatch/") + "#scalars",
            ),
            ("tensorboard_custom_scalars.png", base + "#custom_scalars"),
            ("tensorboard_timeseries.png", base + "#timeseries"),  # 1600x1000: the first screen
        ]:
            screenshot(url, OUT / name, tmp / "chromium")
            print(f"screenshot: {OUT / name}")
    finally:
        tb.send_signal(signal.SIGTERM)
        tb.wait(timeout=30)
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
