"""Reader scenarios after TensorBoard's event_file_loader_test.py, on real event files.

Files come from TensorBoard's and torch's own writers; the broken cases are raw bytes. The full
sequence is checked against TensorBoard's EventAccumulator, an independent reader.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tensorboard.backend.event_processing import event_accumulator, plugin_event_accumulator
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from tensorboard.util import tensor_util
from torch.utils.tensorboard import SummaryWriter

from lrwatch.errors import RunGone
from lrwatch.events.decode import frame_record
from lrwatch.events.reader import EventFileReader, RunReader, find_runs, read_run
from lrwatch.schema import DAEMON_SUBRUN, Scalar


def record(step: int, values: dict[str, float], wall_time: float = 1000.0) -> bytes:
    """One framed event holding ``values`` as simple_value scalars."""
    ev = event_pb2.Event(wall_time=wall_time + step, step=step)
    for tag, v in values.items():
        ev.summary.value.add(tag=tag, simple_value=v)
    return frame_record(ev.SerializeToString())


def header_record() -> bytes:
    return frame_record(
        event_pb2.Event(wall_time=999.0, file_version="brain.Event:2").SerializeToString()
    )


def expected(step: int, values: dict[str, float], wall_time: float = 1000.0) -> list[Scalar]:
    # Round through float32 the way simple_value stores it.
    f32 = [float(np.float32(v)) for v in values.values()]
    return [Scalar(t, step, wall_time + step, v) for t, v in zip(values, f32, strict=True)]


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


@pytest.fixture
def events(tmp_path: Path) -> Path:
    path = tmp_path / "events.out.tfevents.1.host"
    path.write_bytes(header_record())
    return path


def test_reader_matches_event_accumulator_on_summary_writer_files(tmp_path: Path) -> None:
    with SummaryWriter(tmp_path) as w:
        for step in range(50):
            w.add_scalar("loss", 1.0 / (step + 1), step)
            w.add_scalar("val/loss", step * 0.1, step)
            w.add_scalars("group", {"a": step, "b": -step}, step)  # sub-runs: other directories
    acc = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    oracle = sorted(
        (s.step, tag, s.wall_time, s.value)
        for tag in acc.Tags()["scalars"]
        for s in acc.Scalars(tag)
    )
    got = sorted((s.step, s.tag, s.wall_time, s.value) for s in read_run(tmp_path))
    assert got == oracle
    assert len(got) == 100
    assert len(find_runs(tmp_path)) == 3  # the run plus the two add_scalars sub-runs


def test_reader_decodes_tensor_scalars_like_plugin_event_accumulator(tmp_path: Path) -> None:
    with SummaryWriter(tmp_path) as w:
        for step in range(5):
            w.add_scalar("new_style", step * 0.25, step, new_style=True)
            w.add_scalar("double", step / 3.0, step, new_style=True, double_precision=True)
    acc = plugin_event_accumulator.EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    acc.Reload()
    oracle = sorted(
        (t.step, tag, float(tensor_util.make_ndarray(t.tensor_proto)))
        for tag in acc.Tags()["tensors"]
        for t in acc.Tensors(tag)
    )
    got = sorted((s.step, s.tag, s.value) for s in read_run(tmp_path))
    assert got == oracle
    assert len(got) == 10


def _tensor_event(
    tag: str, tensor: tensor_pb2.TensorProto, plugin: str = "scalars"
) -> event_pb2.Event:
    meta = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin)
    )
    ev = event_pb2.Event(step=7, wall_time=5.0)
    ev.summary.value.add(tag=tag, tensor=tensor, metadata=meta)
    return ev


def test_reader_decodes_every_numeric_tensor_dtype_and_skips_the_rest(tmp_path: Path) -> None:
    scalar_shape = tensor_shape_pb2.TensorShapeProto()
    one = tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1)])
    three = tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=3)])
    half_bits = int(np.array(1.5, np.float16).view(np.uint16))
    cases = {
        "float": tensor_pb2.TensorProto(dtype=1, tensor_shape=scalar_shape, float_val=[2.5]),
        "double_content": tensor_util.make_tensor_proto(np.float64(-0.125)),
        "int64": tensor_pb2.TensorProto(dtype=9, tensor_shape=one, int64_val=[12345678901]),
        "int32": tensor_pb2.TensorProto(dtype=3, int_val=[-4]),
        "half": tensor_pb2.TensorProto(dtype=19, half_val=[half_bits]),
        "bfloat16": tensor_pb2.TensorProto(dtype=14, tensor_content=struct.pack("<f", 3.0)[2:]),
    }
    skipped = {
        "vector": tensor_pb2.TensorProto(dtype=1, tensor_shape=three, float_val=[1, 2, 3]),
        "string": tensor_pb2.TensorProto(dtype=7, string_val=[b"hi"]),
    }
    writer = EventFileWriter(str(tmp_path))
    for tag, tensor in {**cases, **skipped}.items():
        writer.add_event(_tensor_event(tag, tensor))
    writer.add_event(_tensor_event("hist", cases["float"], plugin="histograms"))
    writer.close()
    got = {s.tag: s.value for s in read_run(tmp_path)}
    want = {"float": 2.5, "double_content": -0.125, "int64": 12345678901.0, "int32": -4.0}
    assert got == {**want, "half": 1.5, "bfloat16": 3.0}


def test_reader_skips_images_histograms_and_text(tmp_path: Path) -> None:
    with SummaryWriter(tmp_path) as w:
        w.add_histogram("h", np.arange(10.0), 0)
        w.add_image("img", np.zeros((3, 4, 4)), 0)
        w.add_text("txt", "hello", 0)
        w.add_scalar("loss", 0.5, 0)
    assert [(s.tag, s.value) for s in read_run(tmp_path)] == [("loss", 0.5)]


def test_reader_empty_file_yields_nothing(tmp_path: Path) -> None:
    path = tmp_path / "events.out.tfevents.0.empty"
    path.touch()
    assert list(EventFileReader(path).read()) == []
    assert RunReader(tmp_path).poll() == []


def test_reader_growing_file_yields_only_new_records(events: Path) -> None:
    reader = EventFileReader(events)
    append(events, record(0, {"a": 1.0}))
    assert list(reader.read()) == expected(0, {"a": 1.0})
    assert list(reader.read()) == []
    append(events, record(1, {"a": 2.0}) + record(2, {"a": 3.0, "b": 4.0}))
    assert list(reader.read()) == expected(1, {"a": 2.0}) + expected(2, {"a": 3.0, "b": 4.0})


@pytest.mark.parametrize("cut", [1, 8, 11, 12, 20, -5, -4, -1], ids=lambda c: f"cut{c}")
def test_reader_truncated_record_is_read_once_when_completed(events: Path, cut: int) -> None:
    rec = record(3, {"loss": 0.25})
    reader = EventFileReader(events)
    append(events, rec[:cut])
    assert list(reader.read()) == []
    assert list(reader.read()) == []
    append(events, rec[cut:])
    assert list(reader.read()) == expected(3, {"loss": 0.25})
    assert list(reader.read()) == []


def test_reader_not_iterating_consumes_nothing(events: Path) -> None:
    append(events, record(0, {"a": 1.0}))
    reader = EventFileReader(events)
    reader.read()  # a generator nobody iterates
    assert list(reader.read()) == expected(0, {"a": 1.0})


def test_reader_stopping_inside_a_record_resumes_at_the_next_value(events: Path) -> None:
    values = {f"t{i}": float(i) for i in range(5)}
    append(events, record(0, values) + record(1, {"z": 9.0}))
    reader = EventFileReader(events)
    it = reader.read()
    first = [next(it), next(it)]
    it.close()
    rest = list(reader.read())
    assert first + rest == expected(0, values) + expected(1, {"z": 9.0})


def test_reader_replaced_file_is_read_again_from_the_start(
    events: Path, caplog: pytest.LogCaptureFixture
) -> None:
    append(events, record(0, {"a": 1.0}) + record(1, {"a": 2.0}))
    reader = EventFileReader(events)
    assert len(list(reader.read())) == 2
    fresh = events.with_name("tmp")
    fresh.write_bytes(header_record() + record(5, {"b": 7.0}))
    os.replace(fresh, events)
    with caplog.at_level(logging.WARNING, logger="lrwatch.events.reader"):
        assert list(reader.read()) == expected(5, {"b": 7.0})
    assert sum("replaced" in r.message for r in caplog.records) == 1


def test_reader_truncated_file_starts_over_without_repeating_what_it_kept(events: Path) -> None:
    keep = header_record() + record(0, {"a": 1.0})
    events.write_bytes(keep + record(1, {"a": 2.0}) + record(2, {"a": 3.0}))
    reader = EventFileReader(events)
    assert len(list(reader.read())) == 3
    os.truncate(events, len(keep))
    assert list(reader.read()) == []
    append(events, record(1, {"a": 20.0}))
    assert list(reader.read()) == expected(1, {"a": 20.0})


def test_reader_file_rewritten_from_empty_is_read_from_the_start(events: Path) -> None:
    append(events, record(0, {"a": 1.0}))
    reader = EventFileReader(events)
    assert len(list(reader.read())) == 1
    os.truncate(events, 0)
    assert list(reader.read()) == []
    events.write_bytes(header_record() + record(0, {"a": 5.0}))
    assert list(reader.read()) == expected(0, {"a": 5.0})


@pytest.mark.parametrize("where", ["data", "length", "footer"])
def test_reader_corrupted_record_warns_once_and_resynchronises(
    events: Path, where: str, caplog: pytest.LogCaptureFixture
) -> None:
    good = [record(i, {"a": float(i)}) for i in range(6)]
    bad = bytearray(good[1])
    offset = {"data": 20, "length": 2, "footer": len(bad) - 1}[where]
    bad[offset] ^= 0xFF
    bad3 = bytearray(good[3])
    bad3[offset] ^= 0x10
    append(events, good[0] + bytes(bad) + good[2] + bytes(bad3) + good[4])
    reader = EventFileReader(events)
    with caplog.at_level(logging.WARNING, logger="lrwatch.events.reader"):
        got = list(reader.read())
        append(events, good[5])
        got += list(reader.read())
    assert [s.step for s in got] == [0, 2, 4, 5]
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_run_reader_reads_several_files_in_name_order_and_new_ones(tmp_path: Path) -> None:
    (tmp_path / "events.out.tfevents.2.b").write_bytes(header_record() + record(2, {"a": 2.0}))
    (tmp_path / "events.out.tfevents.1.a").write_bytes(header_record() + record(1, {"a": 1.0}))
    (tmp_path / "notes.txt").write_text("not an event file")
    run = RunReader(tmp_path)
    assert [s.step for s in run.poll()] == [1, 2]
    assert run.poll() == []
    (tmp_path / "events.out.tfevents.3.c").write_bytes(header_record() + record(3, {"a": 3.0}))
    append(tmp_path / "events.out.tfevents.1.a", record(4, {"a": 4.0}))
    assert [s.step for s in run.poll()] == [4, 3]


def test_run_reader_sees_new_files_in_a_directory_it_stopped_listing(tmp_path: Path) -> None:
    (tmp_path / "events.out.tfevents.1.a").write_bytes(header_record() + record(1, {"a": 1.0}))
    os.utime(tmp_path, (1e9, 1e9))  # an old directory: polls rely on its mtime
    run = RunReader(tmp_path)
    assert [s.step for s in run.poll()] == [1]
    append(tmp_path / "events.out.tfevents.1.a", record(2, {"a": 2.0}))
    assert [s.step for s in run.poll()] == [2]
    (tmp_path / "events.out.tfevents.2.b").write_bytes(header_record() + record(3, {"a": 3.0}))
    assert [s.step for s in run.poll()] == [3]
    (tmp_path / "events.out.tfevents.1.a").unlink()
    assert run.poll() == []
    assert list(run.state_dict()["files"]) == ["events.out.tfevents.2.b"]


def test_run_reader_state_dict_resumes_without_rereading(tmp_path: Path) -> None:
    path = tmp_path / "events.out.tfevents.1.a"
    path.write_bytes(header_record() + record(0, {"a": 1.0}) + record(1, {"a": 2.0})[:10])
    run = RunReader(tmp_path)
    assert [s.step for s in run.poll()] == [0]
    state = json.loads(json.dumps(run.state_dict()))  # the daemon stores it as JSON
    append(path, record(1, {"a": 2.0})[10:] + record(2, {"a": 3.0}))
    resumed = RunReader(tmp_path)
    resumed.load_state_dict(state)
    assert [s.step for s in resumed.poll()] == [1, 2]
    assert resumed.state_dict()["files"].keys() == run.state_dict()["files"].keys()


def test_run_reader_on_a_vanished_directory_raises_run_gone(tmp_path: Path) -> None:
    with pytest.raises(RunGone):
        RunReader(tmp_path / "missing").poll()
    with pytest.raises(RunGone):
        read_run(tmp_path / "missing")


def test_find_runs_skips_the_daemon_subrun(tmp_path: Path) -> None:
    for rel in ["a", "b/c", f"a/{DAEMON_SUBRUN}", f"a/{DAEMON_SUBRUN}/deeper", "empty"]:
        (tmp_path / rel).mkdir(parents=True, exist_ok=True)
        if rel != "empty":
            (tmp_path / rel / "events.out.tfevents.1.x").write_bytes(header_record())
    assert find_runs(tmp_path) == [tmp_path / "a", tmp_path / "b/c"]
    with pytest.raises(RunGone):
        find_runs(tmp_path / "nope")


@settings(max_examples=40, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8))
def test_reader_any_split_of_appends_yields_each_value_once(
    tmp_path_factory: pytest.TempPathFactory, cuts: list[int]
) -> None:
    stream = header_record() + b"".join(record(i, {"a": float(i), "b": -1.0}) for i in range(8))
    path = tmp_path_factory.mktemp("split") / "events.out.tfevents.1.x"
    path.touch()
    reader = EventFileReader(path)
    got: list[Scalar] = []
    last = 0
    for cut in sorted(c % (len(stream) + 1) for c in cuts) + [len(stream)]:
        append(path, stream[last:cut])
        last = max(last, cut)
        got += reader.read_all() if cut % 2 else list(reader.read())
    assert got == [s for i in range(8) for s in expected(i, {"a": float(i), "b": -1.0})]


def protobuf_scalars(data: bytes) -> list[tuple[str, int, float, float]]:
    """What protobuf itself says one event's simple values are (independent of lrwatch)."""
    ev = event_pb2.Event.FromString(data)
    return [
        (v.tag, ev.step, ev.wall_time, v.simple_value)
        for v in ev.summary.value
        if v.WhichOneof("value") == "simple_value"
    ]


def comparable(row: tuple[str, int, float, float]) -> tuple[object, ...]:
    # NaN != NaN, and sign/payload bits of a NaN are not part of the contract; -0.0 is.
    return tuple(
        (struct.pack("<d", x) if x == x else "nan") if isinstance(x, float) else x for x in row
    )


# The fast path engages from a tag's second record, so events draw from a few tags each.
_tags = st.text(max_size=130) | st.sampled_from(["", "loss", "lrwatch/loss", "é/∑/😀", "a" * 118])
_events = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=3),
        st.integers(min_value=-(2**63), max_value=2**63 - 1)
        | st.integers(min_value=-3, max_value=2**22),
        st.floats(width=64) | st.sampled_from([0.0, -0.0, 1.7e9]),
        st.floats(width=32) | st.sampled_from([0.0, -0.0, float("inf"), float("nan")]),
        st.integers(min_value=1, max_value=6),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(tags=st.lists(_tags, min_size=4, max_size=4), events=_events)
def test_reader_fast_layout_gives_exactly_what_protobuf_gives(
    tmp_path_factory: pytest.TempPathFactory,
    tags: list[str],
    events: list[tuple[int, int, float, float, int]],
) -> None:
    datas = []
    for tag_i, step, wall_time, value, n_values in events:
        ev = event_pb2.Event(wall_time=wall_time, step=step)
        for k in range(n_values):  # several values per event: the many-value layout
            ev.summary.value.add(tag=tags[(tag_i + k) % 4], simple_value=value * (k + 1))
        datas.append(ev.SerializeToString())
    path = tmp_path_factory.mktemp("fast") / "events.out.tfevents.1.x"
    path.write_bytes(b"".join(frame_record(d) for d in datas * 2))
    want = [comparable(row) for d in datas * 2 for row in protobuf_scalars(d)]
    assert [comparable(s) for s in EventFileReader(path).read_all()] == want
    assert [comparable(s) for s in EventFileReader(path).read()] == want


def test_reader_fast_layout_is_used_and_falls_back_on_other_layouts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ev = event_pb2.Event(wall_time=5.0, step=300)
    ev.summary.value.add(tag="loss", simple_value=0.5)
    plain = ev.SerializeToString()
    # Same tag and numbers with an unknown field appended, and the fields in another order:
    # valid protobuf that the fast layout must not match.
    extra = plain + b"\x98\x06\x01"  # field 99 varint
    reordered = plain[9:] + plain[:9]
    bad_utf8 = plain.replace(b"loss", b"\xff\xfe\xfd\xfc")  # protobuf rejects it: so must we
    records = [plain, plain, extra, reordered, bad_utf8, plain]
    path = tmp_path / "events.out.tfevents.1.x"
    path.write_bytes(b"".join(frame_record(d) for d in records))
    reader = EventFileReader(path)
    with caplog.at_level(logging.WARNING):
        assert reader.read_all() == [Scalar("loss", 300, 5.0, 0.5)] * 5
    assert "undecodable event" in caplog.text
    assert list(reader._layouts.values()) == ["loss"]  # the fast path was learnt, and only once


def _old_and_new_runs(root: Path) -> tuple[Path, Path]:
    """The same history under the tag names before issue 12 (item 10) and under today's."""
    from lrwatch import schema

    for name, rename in (("old", {}), ("new", schema.LEGACY_TAGS)):
        with SummaryWriter(str(root / name)) as writer:
            for step in range(1, 80):
                writer.add_scalar(schema.LOSS, 1.0 / step if step != 60 else math.inf, step)
                for old, value in (
                    ("lrwatch/nonfinite", float(step == 60)),
                    ("lrwatch/weight_norm", 3.0),
                ):
                    writer.add_scalar(rename.get(old, old), value, step)
                if step == 40:
                    writer.add_scalar(
                        rename.get("lrwatch/control/ack", "lrwatch/control/ack"), 1.0, step
                    )
                    writer.add_scalar(
                        rename.get("lrwatch/lr_factor", "lrwatch/lr_factor"), 2.0, step
                    )
    return root / "old", root / "new"


def test_reader_should_read_the_tag_names_of_older_lrwatch_files_as_todays(tmp_path: Path) -> None:
    old, new = _old_and_new_runs(tmp_path)
    as_read = [(s.tag, s.step, s.value) for s in read_run(old)]
    assert as_read == [(s.tag, s.step, s.value) for s in read_run(new)]
    assert not any(tag.startswith("lrwatch/control") for tag, _, _ in as_read)


def test_analysis_of_an_older_lrwatch_file_should_equal_that_of_todays(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from lrwatch.cli import main

    old, new = _old_and_new_runs(tmp_path)
    docs = []
    for run in (old, new):
        result = CliRunner().invoke(main, ["analyze", str(run), "--json"])
        assert result.exit_code == 0, result.output
        doc = json.loads(result.output)
        docs.append({k: v for k, v in doc.items() if k != "run"})
    assert docs[0] == docs[1]
    assert any(f["kind"] == "nonfinite" for f in docs[0]["findings"])


def test_reader_many_value_layout_is_used_and_falls_back_on_other_layouts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def event(step: int, **extra: float) -> event_pb2.Event:
        ev = event_pb2.Event(wall_time=5.0 + step, step=step)
        for j in range(100):
            ev.summary.value.add(tag=f"layer{j}/grad_norm", simple_value=step + j / 8)
        return ev

    plain = [event(s).SerializeToString() for s in (300, 301, 20000)]
    with_tensor = event(302)
    with_tensor.summary.value.add(tag="t", tensor=tensor_util.make_tensor_proto(2.5))
    dropped = event(303)
    del dropped.summary.value[50]  # a value missing: the same length nowhere, other tags
    renamed = event(304)
    renamed.summary.value[99].tag = "layer99/grad_nurm"  # same length, one tag differs
    records = [
        *plain,
        plain[0] + b"\x98\x06\x01",  # an unknown field after the summary
        with_tensor.SerializeToString(),
        dropped.SerializeToString(),
        renamed.SerializeToString(),
        plain[1][9:] + plain[1][:9],  # wall_time after the rest: valid protobuf, other layout
        plain[2],
    ]
    path = tmp_path / "events.out.tfevents.1.x"
    path.write_bytes(b"".join(frame_record(d) for d in records))
    reader = EventFileReader(path)
    want = [comparable(row) for d in records for row in protobuf_scalars(d)]
    got = reader.read_all()
    tensor_at = 4 * 100 + 100  # after plain x3, the unknown-field event, then 100 simple values
    assert got[tensor_at] == Scalar("t", 302, 307.0, 2.5)
    assert [comparable(s) for s in got[:tensor_at] + got[tensor_at + 1 :]] == want
    # Learnt: the plain tags (from the first record), and the two other valid tag tuples; not
    # the unknown field, the tensor or the reordered fields.
    learnt = [layout.tags for kinds in reader._many.values() for layout in kinds]
    assert len(learnt) == 3 and learnt[0] == tuple(f"layer{j}/grad_norm" for j in range(100))
    assert not caplog.records


def test_run_reader_has_news_should_see_appends_new_files_and_a_vanished_run(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    path = run / "events.out.tfevents.1.host"
    path.write_bytes(header_record() + record(1, {"a": 1.0}))
    os.utime(run, (1e9, 1e9))  # an old directory: its mtime is trusted, not re-listed
    reader = RunReader(run)
    assert reader.has_news()  # never read
    reader.poll()
    assert not reader.has_news()
    append(path, record(2, {"a": 2.0}))
    assert reader.has_news()
    assert reader.poll() == expected(2, {"a": 2.0})
    assert not reader.has_news()
    (run / "events.out.tfevents.2.host").write_bytes(header_record())
    assert reader.has_news()  # the directory changed
    reader.poll()
    shutil.rmtree(run)
    assert reader.has_news()  # poll then says RunGone


def test_reader_many_value_layout_is_learnt_once_however_short_the_tags(tmp_path: Path) -> None:
    path = tmp_path / "events.out.tfevents.1.x"
    rows = [{"a": i / 3, "bb": -i, "c": 2.0**i} for i in range(50)]
    path.write_bytes(b"".join(record(i + 1, row) for i, row in enumerate(rows)))
    reader = EventFileReader(path)
    assert reader.read_all() == [s for i, row in enumerate(rows) for s in expected(i + 1, row)]
    assert [k.tags for kinds in reader._many.values() for k in kinds] == [("a", "bb", "c")]
