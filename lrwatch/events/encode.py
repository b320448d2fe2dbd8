"""TensorBoard event records as bytes: the hand encoding behind :mod:`.writer`.

A record is a TFRecord frame (length, masked CRC32C of the length, data, masked CRC32C of the
data) around a serialised ``tensorboard.Event``. Scalar events are the hot path, so their
protobuf bytes are assembled here with one precompiled :class:`struct.Struct` per tag tuple
(the writer module's docstring cites the benchmark); the result equals
``event_pb2.Event.SerializeToString()`` byte for byte, which the tests check. The rare records
(file header, text summaries) are built with TensorBoard's own protobuf classes.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

import crc32c

FILE_VERSION = "brain.Event:2"

_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_WALL = struct.Struct("<Bd")  # Event.wall_time=1 (fixed64) and its value
_MAX_LAYOUTS = 1024  # distinct tag tuples kept compiled; a caller making up tags can't grow memory


def _masked_crc(data: bytes) -> int:
    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


_SMALL = tuple(bytes((i,)) for i in range(0x80))
_heads: dict[int, bytes] = {}  # record length -> length + its CRC: a run repeats few lengths


def frame(data: bytes) -> bytes:
    """One TFRecord around ``data``."""
    head = _heads.get(len(data))
    if head is None:
        if len(_heads) >= _MAX_LAYOUTS:
            _heads.clear()
        length = _U64.pack(len(data))
        head = _heads[len(data)] = length + _U32.pack(_masked_crc(length))
    return head + data + _U32.pack(_masked_crc(data))


def _varint(n: int) -> bytes:
    if 0 <= n < 0x80:
        return _SMALL[n]
    if n < 0:  # int64 fields: negative numbers are ten-byte two's complement
        n += 1 << 64
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


class SummaryLayout:
    """The fixed bytes of ``Summary{value{tag, simple_value}}`` for one tuple of tags."""

    __slots__ = ("args", "struct", "summary_head")

    def __init__(self, tags: tuple[str, ...]) -> None:
        heads = []
        for tag in tags:
            if not isinstance(tag, str):
                raise TypeError(f"tag {tag!r} is not a str")
            raw = tag.encode("utf-8")
            value = (
                b"\x0a" + _varint(len(raw)) + raw if raw else b""
            ) + b"\x15"  # tag=1, simple_value=2
            heads.append(b"\x0a" + _varint(len(value) + 4) + value)  # Summary.value=1 (message)
        self.struct = struct.Struct("<" + "".join(f"{len(h)}sf" for h in heads))
        self.args: list[object] = [None] * (2 * len(heads))  # heads interleaved with the values
        self.args[0::2] = heads
        self.summary_head = b"\x2a" + _varint(self.struct.size)  # Event.summary=5, fixed length


_layouts: dict[tuple[str, ...], SummaryLayout] = {}


def _layout(tags: tuple[str, ...]) -> SummaryLayout:
    layout = _layouts.get(tags)
    if layout is None:
        if len(_layouts) >= _MAX_LAYOUTS:
            _layouts.clear()
        layout = _layouts[tags] = SummaryLayout(tags)
    return layout


def _event_head(step: int, wall_time: float) -> bytes:
    """``Event.wall_time`` and ``Event.step``; zero fields are omitted, as protobuf does.

    Protobuf omits a double only when all its bits are zero, so ``-0.0`` is written.
    """
    omit = wall_time == 0.0 and math.copysign(1.0, wall_time) > 0
    head = b"" if omit else _WALL.pack(0x09, wall_time)
    return head + b"\x10" + _varint(step) if step != 0 else head


def encode_scalar_rows(
    steps: Sequence[int],
    tags: tuple[str, ...],
    rows: Sequence[Sequence[float]],
    wall_times: Sequence[float],
) -> bytes:
    """Framed records, one event per row holding ``rows[i][j]`` under ``tags[j]``.

    Raises ``struct.error``/``TypeError`` for non-numbers, ``ValueError`` for a row of the wrong
    length and ``OverflowError`` for a finite value beyond float32 (the caller rounds it first).
    """
    if not tags:
        return b""
    layout = _layout(tags)
    args = list(layout.args)
    pack, summary_head = layout.struct.pack, layout.summary_head
    out = []
    for step, row, wall_time in zip(steps, rows, wall_times, strict=True):
        args[1::2] = row
        out.append(frame(_event_head(step, wall_time) + summary_head + pack(*args)))
    return b"".join(out)


def file_version_record(wall_time: float) -> bytes:
    """The first record of every event file: ``file_version: "brain.Event:2"``."""
    from tensorboard.compat.proto import event_pb2

    event = event_pb2.Event(wall_time=wall_time, file_version=FILE_VERSION)
    return frame(event.SerializeToString())


def text_record(step: int, tag: str, text: str, wall_time: float) -> bytes:
    """A text summary in the form TensorBoard's text plugin renders (a DT_STRING tensor)."""
    from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2
    from tensorboard.plugins.text import plugin_data_pb2

    metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(
            plugin_name="text",
            content=plugin_data_pb2.TextPluginData(version=0).SerializeToString(),
        )
    )
    tensor = tensor_pb2.TensorProto(
        dtype="DT_STRING",
        string_val=[text.encode("utf-8")],
        tensor_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1)]
        ),
    )
    summary = summary_pb2.Summary(
        value=[summary_pb2.Summary.Value(tag=tag, metadata=metadata, tensor=tensor)]
    )
    event = event_pb2.Event(wall_time=wall_time, step=step, summary=summary)
    return frame(event.SerializeToString())
