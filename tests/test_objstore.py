"""Run directories in object storage, against a real S3-compatible server (moto's server mode).

The trainer side writes with ``watch(logdir="s3://...")``; what lands in the bucket is read
back with boto3 and TensorBoard's own ``EventAccumulator`` (not lrwatch's code); the daemon side
mirrors it with ranged reads; a control document put in the bucket reaches the training loop.
The end-to-end run with real trainer and daemon processes is tests/test_objstore_e2e.py.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from waiting import wait_for

pytest.importorskip("s3fs", reason="needs the [s3] extra")

import lrwatch  # noqa: E402
from lrwatch import schema  # noqa: E402
from lrwatch.events.reader import read_run  # noqa: E402
from lrwatch.events.writer import EventWriter  # noqa: E402
from lrwatch.objstore import store, upload  # noqa: E402
from lrwatch.objstore.location import is_url, local_copy  # noqa: E402
from lrwatch.objstore.mirror import Mirror  # noqa: E402
from lrwatch.objstore.segments import segment_name, split_segment, whole_records  # noqa: E402

S3Server = Any  # tests/conftest.py


def objects(s3: S3Server, prefix: str = "") -> dict[str, bytes]:
    """Every object under ``prefix`` in the bucket, read with boto3 (not with lrwatch)."""
    bucket = s3.url.removeprefix("s3://")
    client = s3.client()
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    return {k: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def put(s3: S3Server, key: str, data: bytes) -> None:
    s3.client().put_object(Bucket=s3.url.removeprefix("s3://"), Key=key, Body=data)


def train(mon: lrwatch.Monitor, model: torch.nn.Module, opt: Any, steps: int) -> dict[int, float]:
    """``steps`` SGD steps with the loss handed to ``mon.log``; the losses logged, by step."""
    logged = {}
    for _ in range(steps):
        loss = model(torch.randn(16, 8)).pow(2).mean()
        loss.backward()
        mon.log(loss=loss)
        opt.step()
        opt.zero_grad()
        logged[mon.step] = loss.item()
    return logged


def write_diverging_run(s3: S3Server) -> lrwatch.Monitor:
    """60 steps of a run whose LR is far too high (the daemon acts on it) into runs/hot; its
    closed monitor (``run_dir`` is the local spool)."""
    model = torch.nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=3.0)
    mon = lrwatch.watch(model, opt, logdir=f"{s3.url}/runs/hot", flush_secs=0.05)
    train(mon, model, opt, 60)
    mon.close()
    return mon


def linear() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Linear(8, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.01)


# ------------------------------------------------------------------------------- pure parts
def test_whole_records_should_stop_where_the_last_complete_record_ends() -> None:
    from tensorboard.summary.writer.record_writer import RecordWriter

    rng = random.Random(0)
    buf = io.BytesIO()
    writer, ends = RecordWriter(buf), [0]
    for _ in range(40):
        payload = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300)))
        writer.write(payload)
        ends.append(len(buf.getvalue()))
    data = buf.getvalue()
    for cut in range(len(data) + 1):  # every byte boundary: TensorBoard's framing is the oracle
        whole = [e for e in ends if e <= cut]
        assert whole_records(data[:cut]) == whole[-1]
        enough = rng.randrange(1, len(data))  # a segment's size cap: the first boundary past it
        assert whole_records(data[:cut], enough=enough) == min(
            [e for e in whole if e >= enough] or [whole[-1]]
        )


def test_segment_names_should_sort_in_write_order_and_name_their_file() -> None:
    base = "events.out.tfevents.0001700000.host.42.0.lrwatch"
    names = [segment_name(base, i) for i in (0, 1, 2, 10, 999999)]
    names.append(segment_name(base.replace(".0.lrwatch", ".1.lrwatch"), 0))  # re-created file
    assert sorted(names) == names and all(n.endswith(".lrwatch") for n in names)
    assert [split_segment(n) for n in names[:2]] == [(base, 0), (base, 1)]
    assert split_segment("events.out.tfevents.1.host") is None
    assert split_segment(segment_name("events.out.tfevents.1.host", 3)) == (
        "events.out.tfevents.1.host", 3
    )  # fmt: skip


def test_urls_should_be_told_from_paths_and_map_to_one_local_copy(tmp_path: Path) -> None:
    assert is_url("s3://b/runs") and is_url("gs://b") and not is_url("runs/exp1")
    assert not is_url("file:///tmp/runs") and not is_url(Path("s3://b"))
    assert local_copy(tmp_path, "s3://b/runs//exp1/") == tmp_path / "s3" / "b" / "runs" / "exp1"
    with pytest.raises(lrwatch.errors.ConfigError):
        local_copy(tmp_path, "s3://b/../etc")


# ------------------------------------------------------------------------------- the hook
def test_a_run_written_to_s3_should_read_in_tensorboard_as_logged(
    s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setattr(upload, "SEGMENT_BYTES", 4096)  # several segments from a short run
    model, opt = linear()
    mon = lrwatch.watch(model, opt, logdir=f"{s3.url}/runs/exp1", flush_secs=0.05)
    logged = train(mon, model, opt, 300)
    mon.close()
    found = objects(s3, "runs/exp1/")
    segments = sorted(k for k in found if "tfevents" in k)
    assert len(segments) >= 3
    [spool_file] = mon.run_dir.glob("*tfevents*")
    assert b"".join(found[k] for k in segments) == spool_file.read_bytes()
    copy = tmp_path / "downloaded"
    copy.mkdir()
    for key in segments:  # each segment an event file of its own, as TensorBoard lists them
        (copy / key.rsplit("/", 1)[1]).write_bytes(found[key])
    acc = EventAccumulator(str(copy), size_guidance={"scalars": 0})
    acc.Reload()
    loss = {e.step: e.value for e in acc.Scalars(schema.LOSS)}
    assert loss == pytest.approx({s: float(torch.tensor(v)) for s, v in logged.items()}, rel=1e-6)
    assert [e.step for e in acc.Scalars(schema.CLOSED)] == [300]


def test_a_control_document_in_the_bucket_should_reach_the_training_loop(s3: S3Server) -> None:
    model, opt = linear()
    mon = lrwatch.watch(model, opt, logdir=f"{s3.url}/exp2", flush_secs=0.05)
    train(mon, model, opt, 5)
    doc = {"version": 1, "actions": [{"id": 1, "action": "lr_cut", "factor": 10}]}
    put(s3, f"exp2/{schema.CONTROL_FILENAME}", json.dumps(doc).encode())
    deadline = time.monotonic() + 30
    while not mon._controller or mon._controller.lr_factor != 10:  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "the cut never reached the trainer"
        train(mon, model, opt, 1)
    mon.close()
    record = json.loads(objects(s3, "exp2/")[f"exp2/{schema.APPLIED_FILENAME}"])
    assert record["applied_ids"] == [1] and record["cuts"] == [[1, 10]]
    lrs = {s.step: s.value for s in read_run(mon.run_dir) if s.tag == schema.LR}
    applied = min(s.step for s in read_run(mon.run_dir) if s.tag == schema.CONTROL_ACK)
    assert lrs[applied - 1] == pytest.approx(0.01) and lrs[applied] == pytest.approx(0.001)


def test_a_malformed_control_object_should_be_refused_like_a_local_file(
    s3: S3Server, caplog: pytest.LogCaptureFixture
) -> None:
    put(s3, f"exp3/{schema.CONTROL_FILENAME}", b'{"version": 1, "actions": [{"id": 1, ')
    model, opt = linear()
    with caplog.at_level(logging.WARNING, logger="lrwatch"):
        mon = lrwatch.watch(model, opt, logdir=f"{s3.url}/exp3", flush_secs=0.05)
        wait_for(lambda: (mon.run_dir / schema.CONTROL_FILENAME).exists())
        train(mon, model, opt, 30)
        mon.close()
    refused = [r.getMessage() for r in caplog.records if "control file refused" in r.getMessage()]
    assert len(refused) == 1 and "not valid JSON" in refused[0]
    assert mon._controller is not None and mon._controller.applied_ids == []


def test_a_bucket_that_does_not_exist_should_warn_and_keep_everything_in_the_spool(
    s3: S3Server, caplog: pytest.LogCaptureFixture
) -> None:
    model, opt = linear()
    with caplog.at_level(logging.WARNING, logger="lrwatch"):
        mon = lrwatch.watch(model, opt, logdir="s3://no-such-bucket-lrwatch/exp", flush_secs=0.05)
        logged = train(mon, model, opt, 50)
        mon.close()
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "no-such-bucket-lrwatch" in text and "training continues" in text
    assert "not everything reached" in text
    kept = {s.step for s in read_run(mon.run_dir) if s.tag == schema.LOSS}
    assert kept == set(logged)


def test_the_endpoint_going_away_mid_run_should_not_stop_training_and_lose_nothing(
    s3: S3Server, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(upload, "RETRY_SECS", 0.2)
    options = {"config_kwargs": {"retries": {"max_attempts": 1}}}  # fail fast while it is down
    monkeypatch.setattr(store, "_S3_OPTIONS", options)
    model, opt = linear()
    with caplog.at_level(logging.WARNING, logger="lrwatch"):
        mon = lrwatch.watch(model, opt, logdir=f"{s3.url}/exp4", flush_secs=0.05)
        train(mon, model, opt, 20)
        wait_for(lambda: any("tfevents" in k for k in objects(s3, "exp4/")))
        s3.server.stop()  # the endpoint goes away: connections are refused
        logged = train(mon, model, opt, 200)
        wait_for(lambda: f"uploading {s3.url}/exp4 failed" in caplog.text)
        s3.server.start()  # and comes back (moto keeps the bucket in this process)
        logged |= train(mon, model, opt, 20)
        mon.close()
    assert "training continues" in caplog.text
    assert f"uploading {s3.url}/exp4 works again" in caplog.text
    found = objects(s3, "exp4/")
    [spool_file] = mon.run_dir.glob("*tfevents*")
    assert b"".join(v for k, v in sorted(found.items()) if "tfevents" in k) == (
        spool_file.read_bytes()
    )
    assert {s.step for s in read_run(mon.run_dir) if s.tag == schema.LOSS} == set(range(1, 241))
    assert set(logged) == set(range(21, 241))


# ------------------------------------------------------------------------------- the daemon
def test_the_mirror_should_read_each_byte_once_and_rebuild_the_trainers_file(
    s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(upload, "SEGMENT_BYTES", 2048)
    spool = tmp_path / "spool"
    uploader = upload.Uploader(spool, f"{s3.url}/runs/a", put_secs=0.05, control=False)
    writer = EventWriter(spool, filename_suffix=schema.HOOK_FILE_SUFFIX, on_write=uploader.notify)
    mirror = Mirror(f"{s3.url}/runs", tmp_path / "state")
    fetched: list[int] = []
    real_get = mirror.store.get

    def counting_get(key: str, **kw: Any) -> bytes | None:
        data = real_get(key, **kw)
        fetched.append(len(data or b""))
        return data

    monkeypatch.setattr(mirror.store, "get", counting_get)
    try:
        for round_ in range(6):
            for step in range(round_ * 40, round_ * 40 + 40):
                writer.add_scalars(step, [schema.LOSS, schema.LR], [1.0 / (step + 1), 0.1])
            writer.flush()
            size = writer.path.stat().st_size
            wait_for(lambda n=size: sum(map(len, objects(s3, "runs/a/").values())) == n)
            grown = mirror.pull()
            local = mirror.local / "a" / writer.path.name
            assert grown == {local.parent}
            assert local.read_bytes() == writer.path.read_bytes()
    finally:
        writer.close()
        uploader.close()
        mirror.close()
    assert sum(fetched) == writer.path.stat().st_size  # every byte read once, none again
    assert mirror.pull() == set()


@pytest.mark.slow
def test_serve_once_analyze_status_and_report_should_work_on_a_bucket(
    s3: S3Server, tmp_path: Path
) -> None:
    mon = write_diverging_run(s3)
    cmd = [sys.executable, "-m", "lrwatch"]
    once = subprocess.run(
        [*cmd, "serve", "--once", "--apply", f"{s3.url}/runs"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert once.returncode == 0, once.stderr
    assert once.stdout.strip().startswith("1 runs, ")
    found = objects(s3, "runs/hot/")
    control = json.loads(found[f"runs/hot/{schema.CONTROL_FILENAME}"])
    audit = [json.loads(line) for line in found[f"runs/hot/{schema.AUDIT_FILENAME}"].splitlines()]
    assert control["actions"] and [a["id"] for a in control["actions"]] == [
        r["action_id"] for r in audit if r["event"] == "decision" and r["applied"]
    ]
    assert any(f"runs/hot/{schema.DAEMON_SUBRUN}/" in k and "tfevents" in k for k in found)
    remote = subprocess.run(
        [*cmd, "analyze", "--json", f"{s3.url}/runs/hot"], capture_output=True, text=True
    )
    local = subprocess.run(
        [*cmd, "analyze", "--json", str(mon.run_dir)], capture_output=True, text=True
    )
    assert remote.returncode == 0, remote.stderr
    doc, ref = json.loads(remote.stdout), json.loads(local.stdout)
    assert doc["decisions"] == ref["decisions"] and doc["findings"] == ref["findings"]
    status = subprocess.run(
        [*cmd, "status", "--json", f"{s3.url}/runs"], capture_output=True, text=True
    )
    assert status.returncode == 0, status.stderr
    [row] = json.loads(status.stdout)
    assert row["last_step"] == 60 and row["last_decision"] is not None
    if importlib.util.find_spec("matplotlib") is not None:  # the [report] extra
        picture = tmp_path / "hot.png"
        drawn = subprocess.run(
            [*cmd, "report", f"{s3.url}/runs/hot", "-o", str(picture)],
            capture_output=True, text=True,
        )  # fmt: skip
        assert drawn.returncode == 0, drawn.stderr
        assert picture.stat().st_size > 0 and f"{len(doc['decisions'])} decisions" in drawn.stdout


def test_the_training_thread_should_never_touch_the_network(
    s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket
    import threading

    callers: list[str] = []  # the thread of every connection opened while lrwatch is in charge
    lrwatch_in_charge = threading.Event()  # clear while the test itself talks to the server
    real_connect = socket.socket.connect

    def connect(self: socket.socket, address: Any) -> Any:
        if lrwatch_in_charge.is_set() or threading.current_thread() is not threading.main_thread():
            callers.append(threading.current_thread().name)
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    model, opt = linear()
    lrwatch_in_charge.set()
    mon = lrwatch.watch(model, opt, logdir=f"{s3.url}/quiet", flush_secs=0.05)
    train(mon, model, opt, 100)
    lrwatch_in_charge.clear()
    put(s3, f"quiet/{schema.CONTROL_FILENAME}", b'{"version": 1, "actions": []}')
    lrwatch_in_charge.set()
    wait_for(lambda: (mon.run_dir / schema.CONTROL_FILENAME).exists())
    train(mon, model, opt, 20)
    mon.close()
    lrwatch_in_charge.clear()
    assert "tfevents" in "".join(objects(s3, "quiet/"))  # it did go over the network...
    assert callers and threading.main_thread().name not in callers  # ...never from training


def test_a_run_resumed_on_another_host_should_neither_reapply_nor_lose(
    s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    doc = {"version": 1, "actions": [{"id": 1, "action": "lr_cut", "factor": 10}]}
    put(s3, f"moved/{schema.CONTROL_FILENAME}", json.dumps(doc).encode())
    model, opt = linear()
    first = lrwatch.watch(model, opt, logdir=f"{s3.url}/moved", flush_secs=0.05)
    wait_for(lambda: train(first, model, opt, 1) and first.state_dict()["controller"]["cuts"])
    checkpoint = first.state_dict()
    first.close()
    for resume in (False, True):  # each time a host with an empty spool
        monkeypatch.setenv("LRWATCH_SPOOL", str(tmp_path / f"host{int(resume)}"))
        model, opt = linear()
        mon = lrwatch.watch(model, opt, logdir=f"{s3.url}/moved", flush_secs=0.05)
        if resume:
            mon.load_state_dict(checkpoint)
        assert mon._uploader is not None
        wait_for(mon._uploader.pulled.is_set)
        train(mon, model, opt, 20)
        assert mon._controller is not None
        # a new run inherits nothing the earlier one applied; a resumed one keeps its cut in
        # force, and reapplies nothing (one ack of #1 again at its first step, no second cut)
        assert mon._controller.lr_factor == (10 if resume else 1)
        assert mon._controller.applied_ids == ([1] if resume else [])
        mon.close()


@pytest.mark.slow
def test_a_daemon_on_another_machine_should_adopt_the_buckets_history(
    s3: S3Server, tmp_path: Path
) -> None:
    write_diverging_run(s3)
    seen = []
    for machine in ("a", "b"):  # b: another --state-dir, so no mirror and no daemon state
        once = subprocess.run(
            [sys.executable, "-m", "lrwatch", "serve", "--once", "--apply",
             "--state-dir", str(tmp_path / machine), f"{s3.url}/runs"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert once.returncode == 0, once.stderr
        found = objects(s3, "runs/hot/")
        audit = found[f"runs/hot/{schema.AUDIT_FILENAME}"].splitlines()
        seen.append((found[f"runs/hot/{schema.CONTROL_FILENAME}"], audit))
    assert json.loads(seen[0][0])["actions"]
    assert seen[1] == seen[0]  # no action id issued again, no decision line written twice
