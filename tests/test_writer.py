"""EventWriter: what it writes is what TensorBoard's own readers read back, and it never breaks
the caller (unwritable or vanished logdir, full disk, dead thread, bad values, full queue)."""

from __future__ import annotations

import logging
import math
import os
import shutil
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tensorboard.backend.event_processing import event_file_loader
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

import lrwatch.events.sink
from lrwatch.events.encode import encode_scalar_rows
from lrwatch.events.writer import EventWriter

LOGGER = "lrwatch.events.writer"


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[EventWriter]:
    w = EventWriter(tmp_path / "run")
    yield w
    w.close()


def scalars(path: Path) -> dict[str, list[tuple[int, float, float]]]:
    """(step, wall_time, value) per tag, as TensorBoard's EventAccumulator reads them."""
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
    acc.Reload()
    return {
        tag: [(e.step, e.wall_time, e.value) for e in acc.Scalars(tag)]
        for tag in acc.Tags()["scalars"]
    }


def events(path: Path) -> list[Any]:
    return list(event_file_loader.EventFileLoader(str(path)).Load())


def f32(x: float) -> float:
    return float(np.float32(x))


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# ------------------------------------------------------------------ what is written
def test_writer_values_read_back_exactly_by_event_accumulator(writer: EventWriter) -> None:
    tags = [f"lrwatch.grad_norm/layer{i}.weight" for i in range(300)]
    gen = torch.Generator().manual_seed(1)
    sent = {}
    for step in range(5):
        values = torch.randn(300, generator=gen, dtype=torch.float64) * 10.0 ** (step - 2)
        values[step] = (math.nan, math.inf, -math.inf, 0.0, -0.0)[step]
        writer.add_scalars(step, tags, values, wall_time=1000.0 + step / 3)
        sent[step] = values.tolist()
    assert writer.flush()
    read = scalars(writer.path)
    assert sorted(read) == sorted(tags)
    for j, tag in enumerate(tags):
        for step, wall_time, value in read[tag]:
            assert wall_time == 1000.0 + step / 3
            want = f32(sent[step][j])
            assert value == want or (math.isnan(value) and math.isnan(want)), (tag, step)
    assert [e.step for e in events(writer.path)][1:] == list(range(5))  # one event per call


def test_writer_first_record_is_the_file_version(writer: EventWriter) -> None:
    writer.add_scalars(1, ["a"], [1.0])
    assert writer.flush()
    first = events(writer.path)[0]
    assert first.file_version == "brain.Event:2"
    assert writer.path.name.startswith("events.out.tfevents.")


def test_writer_rows_are_one_event_per_step(writer: EventWriter) -> None:
    loss = torch.tensor([[2.5, 1.0], [math.nan, 0.0], [1.25, 1e39]], dtype=torch.float64)
    writer.add_rows([10, 11, 12], ["lrwatch/loss", "lrwatch/nonfinite"], loss)
    writer.add_rows([13], ["lrwatch/loss"], [[0.5]], wall_times=[7.0])
    assert writer.flush()
    read = scalars(writer.path)
    got = [(s, v) for s, _, v in read["lrwatch/loss"]]
    assert got[0] == (10, 2.5) and math.isnan(got[1][1]) and got[2:] == [(12, 1.25), (13, 0.5)]
    assert [v for _, _, v in read["lrwatch/nonfinite"]] == [1.0, 0.0, math.inf]  # 1e39 > f32
    assert read["lrwatch/loss"][-1][1] == 7.0
    assert len(events(writer.path)) == 1 + 4


@pytest.mark.parametrize(
    "values",
    [
        [3.0, 1e39, -1e-46, True, 7],  # Python numbers: struct path, float32 rounding
        torch.tensor([3.0, 1e39, -1e-46, 1.0, 7.0], dtype=torch.float64),
        torch.tensor([3, 2**40, 0, 1, 7]),  # integer tensor
        torch.tensor([3.0, 1.0, 0.5, 1.0, 7.0], dtype=torch.bfloat16, requires_grad=True),
    ],
    ids=["python", "float64", "int64", "bfloat16-requires-grad"],
)
def test_writer_rounds_any_number_like_float32(writer: EventWriter, values: Any) -> None:
    tags = list("abcde")
    writer.add_scalars(0, tags, values)
    assert writer.flush()
    read = scalars(writer.path)
    want = torch.as_tensor(values).detach().to(torch.float32).tolist()
    assert [read[t][0][2] for t in tags] == want


def test_writer_text_summary_is_for_the_text_plugin(writer: EventWriter) -> None:
    text = "lr_cut by 10: **oscillation** at step 40 (ü)"
    writer.add_text(40, "lrwatch_daemon/decisions", text, wall_time=5.0)
    assert writer.flush()
    acc = EventAccumulator(str(writer.path), size_guidance={"tensors": 0})
    acc.Reload()
    assert "lrwatch_daemon/decisions" in acc.PluginTagToContent("text")
    (event,) = acc.Tensors("lrwatch_daemon/decisions")
    assert (event.step, event.wall_time) == (40, 5.0)
    assert event.tensor_proto.dtype == 7  # DT_STRING
    assert [s.decode() for s in event.tensor_proto.string_val] == [text]


@settings(max_examples=60, deadline=None)
@given(
    tags=st.lists(st.text(max_size=200), min_size=1, max_size=6, unique=True),
    step=st.integers(-(2**63), 2**63 - 1),
    wall_time=st.floats(allow_nan=False, width=64),
    data=st.data(),
)
def test_encoding_equals_protobuf_and_frame_crcs_are_tfrecord(
    tags: list[str], step: int, wall_time: float, data: st.DataObject
) -> None:
    values = data.draw(
        st.lists(st.floats(width=32, allow_nan=False), min_size=len(tags), max_size=len(tags))
    )
    record = encode_scalar_rows((step,), tuple(tags), (values,), (wall_time,))
    (length,) = struct.unpack("<Q", record[:8])
    assert len(record) == 8 + 4 + length + 4
    payload = record[12:-4]
    assert struct.unpack("<I", record[8:12])[0] == masked_crc32c(record[:8])
    assert struct.unpack("<I", record[-4:])[0] == masked_crc32c(payload)
    expected = event_pb2.Event(
        wall_time=wall_time,
        step=step,
        summary=summary_pb2.Summary(
            value=[
                summary_pb2.Summary.Value(tag=t, simple_value=v)
                for t, v in zip(tags, values, strict=True)
            ]
        ),
    )
    assert payload == expected.SerializeToString()


def test_negative_zero_wall_time_is_encoded_like_protobuf() -> None:
    # Found by the property test above: protobuf omits a double only when all its bits are 0.
    record = encode_scalar_rows((1,), ("a",), ((-0.0,),), (-0.0,))
    value = summary_pb2.Summary.Value(tag="a", simple_value=-0.0)
    expected = event_pb2.Event(wall_time=-0.0, step=1, summary=summary_pb2.Summary(value=[value]))
    assert record[12:-4] == expected.SerializeToString()


# ------------------------------------------------------------------ failure safety
def test_writer_unwritable_logdir_warns_once_and_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lrwatch.events.sink, "RETRY_SECS", 0.0)
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a regular file where the logdir's parent should be")
    with caplog.at_level(logging.WARNING, LOGGER):
        w = EventWriter(blocker / "run")
        for step in range(3):
            w.add_scalars(step, ["a"], [float(step)])
            assert not w.flush()
        assert not w.healthy
        assert len(warnings_of(caplog)) == 1 and "cannot write" in warnings_of(caplog)[0]
        blocker.unlink()  # the logdir becomes possible: the next write opens the file
        w.add_scalars(3, ["a"], [3.0])
        assert w.flush() and w.healthy
        w.close()
    assert [(s, v) for s, _, v in scalars(w.path)["a"]] == [(3, 3.0)]


def test_writer_logdir_removed_midrun_recreates_it_and_loses_nothing_after(
    writer: EventWriter, caplog: pytest.LogCaptureFixture
) -> None:
    writer.add_scalars(0, ["a"], [0.0])
    assert writer.flush()
    first = writer.path
    with caplog.at_level(logging.WARNING, LOGGER):
        shutil.rmtree(first.parent)
        for step in range(1, 4):
            writer.add_scalars(step, ["a"], [float(step)])
        assert writer.flush()
        writer.add_scalars(4, ["a"], [4.0])
        assert writer.flush() and writer.healthy
    assert len(warnings_of(caplog)) == 1 and "deleted" in warnings_of(caplog)[0]
    assert writer.path != first and writer.path.parent == first.parent
    assert [(s, v) for s, _, v in scalars(writer.path)["a"]] == [(s, float(s)) for s in range(1, 5)]
    assert events(writer.path)[0].file_version == "brain.Event:2"


def test_writer_full_disk_drops_then_resumes_with_a_valid_file(
    writer: EventWriter, caplog: pytest.LogCaptureFixture
) -> None:
    writer.add_scalars(0, ["a"], [0.0])
    assert writer.flush()
    fd = writer._sink._fd
    assert fd is not None
    saved = os.dup(fd)
    full = os.open("/dev/full", os.O_WRONLY)  # the kernel's own ENOSPC, under the writer's fd
    try:
        os.dup2(full, fd)
        with caplog.at_level(logging.WARNING, LOGGER):
            for step in (1, 2):
                writer.add_scalars(step, ["a"], [float(step)])
                assert not writer.flush()
            assert not writer.healthy
        os.dup2(saved, fd)
    finally:
        os.close(full)
        os.close(saved)
    assert len(warnings_of(caplog)) == 1 and "disk is full" in warnings_of(caplog)[0]
    writer.add_scalars(3, ["a"], [3.0])
    assert writer.flush() and writer.healthy
    assert [(s, v) for s, _, v in scalars(writer.path)["a"]] == [(0, 0.0), (3, 3.0)]


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    cmd = ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)]
    if subprocess.run(cmd, capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root); /dev/full test covers ENOSPC")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_writer_real_full_disk_leaves_no_partial_record(
    tiny_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tags = [f"t{i}" for i in range(50)]
    with caplog.at_level(logging.WARNING, LOGGER), EventWriter(tiny_disk / "run") as w:
        step = 0
        while w.flush() and step < 10_000:  # fill the disk: each call ~700 bytes
            w.add_scalars(step, tags, torch.full((50,), float(step)))
            step += 1
        assert not w.healthy
        path = w.path
    assert len(warnings_of(caplog)) == 1 and "disk is full" in warnings_of(caplog)[0]
    read = [e.step for e in events(path)[1:]]  # a partial trailing record would be missing here
    assert read == list(range(len(read))) and 10 < len(read) < step


def test_writer_dead_thread_warns_once_and_calls_become_noops(
    writer: EventWriter, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def bug(data: bytes) -> bool:
        raise RuntimeError("a bug in lrwatch")

    monkeypatch.setattr(writer._sink, "write", bug)
    with caplog.at_level(logging.WARNING, LOGGER):
        writer.add_scalars(0, ["a"], [1.0])
        assert not writer.flush(timeout=10.0)  # released by the dying thread, not the timeout
        writer._thread.join(timeout=10.0)
        assert not writer._thread.is_alive() and not writer.healthy
        for step in range(100):
            writer.add_scalars(step, ["a"], [1.0])
            writer.add_rows([step], ["a"], [[1.0]])
            writer.add_text(step, "t", "x")
        assert not writer.flush(timeout=None)  # returns at once: nothing would ever answer
    assert len(warnings_of(caplog)) == 1 and "crashed" in warnings_of(caplog)[0]


@pytest.mark.parametrize(
    "call",
    [
        lambda w: w.add_scalars(1, ["a", "b"], ["x", 1.0]),
        lambda w: w.add_scalars(1, ["a", "b"], [1.0]),
        lambda w: w.add_scalars(1, ["a", "b"], torch.ones(3)),
        lambda w: w.add_scalars(1, ["a", 2], [1.0, 2.0]),
        lambda w: w.add_scalars(1, ["a"], None),
        lambda w: w.add_scalars(1, ["a"], torch.tensor([1 + 2j])),
        lambda w: w.add_rows([1, 2], ["a"], [[1.0], [2.0, 3.0]]),
        lambda w: w.add_rows([1, 2], ["a"], torch.ones(2, 2)),
        lambda w: w.add_rows([1, 2], ["a"], [[1.0], [2.0]], wall_times=[1.0]),
        lambda w: w.add_rows(["x"], ["a"], [[1.0]]),
        lambda w: w.add_text(1, "t", b"bytes"),
    ],
    ids=[
        "string",
        "too-few",
        "wrong-shape",
        "tag-not-str",
        "none",
        "complex",
        "ragged",
        "rows-shape",
        "wall-times",
        "step-not-int",
        "text-bytes",
    ],
)
def test_writer_bad_values_are_dropped_with_one_warning(
    writer: EventWriter, caplog: pytest.LogCaptureFixture, call: Any
) -> None:
    with caplog.at_level(logging.WARNING, LOGGER):
        writer.add_scalars(0, ["a"], [0.0])
        call(writer)
        call(writer)
        writer.add_scalars(2, ["a"], [2.0])
        assert writer.flush() and writer.healthy
    assert len(warnings_of(caplog)) == 1 and "dropped" in warnings_of(caplog)[0]
    assert [(s, v) for s, _, v in scalars(writer.path)["a"]] == [(0, 0.0), (2, 2.0)]


def test_writer_full_queue_drops_new_calls_without_blocking(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = EventWriter(tmp_path / "run", max_queue=5)
    entered, gate = threading.Event(), threading.Event()
    real_write = w._sink.write

    def stuck_disk(data: bytes) -> bool:
        entered.set()
        assert gate.wait(10.0)
        return real_write(data)

    monkeypatch.setattr(w._sink, "write", stuck_disk)
    with caplog.at_level(logging.WARNING, LOGGER):
        w.add_scalars(0, ["a"], [0.0])
        assert entered.wait(10.0)  # the thread holds step 0 and is stuck in the write
        for step in range(1, 21):
            w.add_scalars(step, ["a"], [float(step)])  # returns at once: queue or drop
        gate.set()
        assert w.flush()
        w.close()
    assert w.dropped == 15
    assert len(warnings_of(caplog)) == 1 and "cannot keep up" in warnings_of(caplog)[0]
    assert [s for s, _, _ in scalars(w.path)["a"]] == list(range(6))


def test_writer_close_is_idempotent_and_later_calls_are_noops(tmp_path: Path) -> None:
    w = EventWriter(tmp_path)
    w.add_scalars(0, ["a"], [1.0])
    w.close()
    w.close()
    w.add_scalars(1, ["a"], [2.0])
    assert not w.flush() and not w.healthy and not w._thread.is_alive()
    assert [s for s, _, _ in scalars(w.path)["a"]] == [0]


def test_writer_rejects_bad_settings_at_construction(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_queue"):
        EventWriter(tmp_path, max_queue=0)
    with pytest.raises(ValueError, match="filename_suffix"):
        EventWriter(tmp_path, filename_suffix="a/b")


def test_writer_events_reach_the_file_without_flush(writer: EventWriter) -> None:
    """The daemon tails the file live: a submitted step must land without anyone flushing."""
    writer.add_scalars(7, ["a"], [7.0])
    landed = threading.Event()
    for _ in range(2000):  # bounded wait on the condition (<= ~10 s), not a sleep
        if any(e.step == 7 for e in events(writer.path)):
            landed.set()
            break
        landed.wait(0.005)
    assert landed.is_set()


def test_writer_accepts_calls_from_several_threads(writer: EventWriter) -> None:
    def submit(k: int) -> None:
        for i in range(200):
            writer.add_scalars(k * 1000 + i, [f"t{k}"], [float(i)])

    threads = [threading.Thread(target=submit, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert writer.flush()
    read = scalars(writer.path)
    for k in range(4):
        assert [(s, v) for s, _, v in read[f"t{k}"]] == [
            (k * 1000 + i, float(i)) for i in range(200)
        ]
