"""TFRecord frames and TensorBoard events as bytes: the decoding half of the reader.

A record is ``uint64 length | uint32 masked_crc32c(length) | data[length] |
uint32 masked_crc32c(data)``, little-endian, around a serialised ``tensorboard.Event``.
:func:`decode_event` is the one place where event values become :class:`~lrwatch.schema.Scalar`.
"""

from __future__ import annotations

import struct
from sys import intern
from typing import Any

import crc32c

from lrwatch.schema import LEGACY_TAGS, Scalar

HEADER = struct.Struct("<QI")  # length, masked CRC of the 8 length bytes
FOOTER = struct.Struct("<I")  # masked CRC of the data
MAX_RECORD = 256 << 20  # a longer "valid" length is corruption that survived the header CRC
MASK_DELTA = 0xA282EAD8


def masked_crc(data: bytes) -> int:
    """TFRecord's masked CRC32C (masking keeps CRCs of CRC-bearing data well distributed)."""
    c = crc32c.crc32c(data)
    return (((c >> 15) | (c << 17)) + MASK_DELTA) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
    """One TFRecord frame around ``data`` (used by tests and the benchmark to write files)."""
    head = struct.pack("<Q", len(data))
    return head + struct.pack("<I", masked_crc(head)) + data + struct.pack("<I", masked_crc(data))


# Tensor dtypes (tensorflow DataType numbers) that hold a number, with the struct format of one
# element in tensor_content and the repeated field used otherwise.
_TENSOR_DTYPES: dict[int, tuple[str, str]] = {
    1: ("<f", "float_val"),  # DT_FLOAT
    2: ("<d", "double_val"),  # DT_DOUBLE
    3: ("<i", "int_val"),  # DT_INT32
    4: ("<B", "int_val"),  # DT_UINT8
    5: ("<h", "int_val"),  # DT_INT16
    6: ("<b", "int_val"),  # DT_INT8
    9: ("<q", "int64_val"),  # DT_INT64
    14: ("<H", "half_val"),  # DT_BFLOAT16: bit pattern, widened below
    17: ("<H", "int_val"),  # DT_UINT16
    19: ("<e", "half_val"),  # DT_HALF: half_val holds the bit pattern
    22: ("<I", "uint32_val"),  # DT_UINT32
    23: ("<Q", "uint64_val"),  # DT_UINT64
}
_BITS_FROM_FIELD = {14: "<H", 19: "<H"}  # half_val holds 16-bit patterns in an int32 field


def _tensor_scalar(value: Any) -> float | None:
    """The number in a one-element numeric tensor, or None for anything else."""
    name = value.metadata.plugin_data.plugin_name
    if name and name != "scalars":  # histograms, images, text... keep their own plugins
        return None
    tensor = value.tensor
    spec = _TENSOR_DTYPES.get(tensor.dtype)
    if spec is None or any(d.size != 1 for d in tensor.tensor_shape.dim):
        return None
    fmt, field = spec
    if tensor.tensor_content:
        if len(tensor.tensor_content) != struct.calcsize(fmt):
            return None
        raw = tensor.tensor_content
    else:
        vals = getattr(tensor, field)
        if len(vals) != 1:
            return None
        if tensor.dtype not in _BITS_FROM_FIELD:
            return float(vals[0])
        raw = struct.pack(_BITS_FROM_FIELD[tensor.dtype], vals[0])
    if tensor.dtype == 14:  # bfloat16 is the top half of a float32
        return float(struct.unpack("<f", b"\0\0" + raw)[0])
    return float(struct.unpack(fmt, raw)[0])


def decode_event(event: Any, out: list[Scalar]) -> None:
    """Append the scalars of one ``Event`` to ``out``: the one place values are decoded.

    ``simple_value`` (torch's ``add_scalar``, tensorboardX, Keras TF1) and one-element numeric
    tensors (``add_scalar(new_style=True)``, ``tf.summary.scalar``) become Scalars; images,
    histograms, audio and text are skipped, and events without a summary are ignored.
    """
    values = event.summary.value  # empty for events without a summary (file_version, ...)
    if not values:
        return
    step = event.step
    wall_time = event.wall_time
    # Tags are interned: a million values then share a few hundred tag strings instead of
    # holding a fresh copy each (about a quarter of a bulk read's memory). tuple.__new__ skips
    # the NamedTuple's Python-level __new__ (0.6 -> 0.3 us per value, ~1.3x with 100 per event).
    # Tags of older lrwatch files are renamed here, the one place every value passes through.
    new, add, rename = tuple.__new__, out.append, LEGACY_TAGS.get
    for value in values:
        kind = value.WhichOneof("value")
        tag = value.tag
        if kind == "simple_value":
            add(new(Scalar, (intern(rename(tag, tag)), step, wall_time, value.simple_value)))
        elif kind == "tensor":
            number = _tensor_scalar(value)
            if number is not None:
                add(new(Scalar, (intern(rename(tag, tag)), step, wall_time, number)))


# The fast path. One event per scalar (torch's ``add_scalar`` per call) is the common file, and
# for it protobuf is most of the cost: bench/reader_throughput.py --quick measured 220-280k
# values/s (10-14x EventFileLoader) with Event.FromString + field access, and 520-800k (18-28x,
# noisy shared machine) when this exact layout is read with struct. The only hand-decoded one:
#   09 <wall_time f64>  10 <step varint>  2a L  0a M  0a T <tag>  15 <simple_value f32>
# Everything from "2a" to "15" (the "key") depends on the tag only. A key is trusted only after
# protobuf decoded a record with it to exactly this one value (learn_layout), so a hit cannot
# disagree with protobuf; anything else (no step or wall time, several values, tensors, unknown
# fields, long tags, negative steps as 10-byte varints) takes the protobuf path.
FAST_MIN = 22  # shortest record of the layout (empty tag, one-byte step)
FAST_MAX_TAG = 118  # longest tag whose L, M and T are one-byte varints
FAST_MAX = 19 + 6 + FAST_MAX_TAG + 1 + 4  # longest record of the layout (skip the lookup above)
MAX_LAYOUTS = 4096  # tags learnt per file; beyond that new tags stay on the protobuf path
WALL_TIME = struct.Struct("<d").unpack_from
SIMPLE_VALUE = struct.Struct("<f").unpack_from


def layout_key(tag: str) -> bytes | None:
    """The bytes from the summary field to the simple_value field of a one-value event."""
    raw = tag.encode("utf-8")
    t = len(raw)
    if t > FAST_MAX_TAG:
        return None
    return bytes((0x2A, t + 9, 0x0A, t + 7, 0x0A, t)) + raw + b"\x15"


def split_layout(data: bytes) -> tuple[int, bytes] | None:
    """(step, key) if ``data`` is framed like the fast layout, else None (inlined in reader)."""
    if len(data) < FAST_MIN or data[0] != 0x09 or data[9] != 0x10:
        return None
    step, shift, p = 0, 0, 10
    while p < 19:
        b = data[p]
        step |= (b & 0x7F) << shift
        shift += 7
        p += 1
        if b < 0x80:
            return step, data[p:-4]
    return None  # a 10-byte varint: a negative step, left to protobuf's int64 rules


# The many-value fast path. An event holding several simple_value scalars (lrwatch's own rows,
# torch's add_scalars of a dict, per-layer norms) was 1.06M values/s through protobuf against a
# 2.3M/s pure-Python parse + CRC floor (bench/reader_throughput.py, issue 13), with protobuf's
# parse and field access the largest part of the profile. After the step varint, such an event is
# ``2a L`` then per value ``0a M 0a T <tag> 15 <f32>``: for a given tuple of tags, everything
# but the floats is fixed. One struct unpack splits the event into those fixed segments and the
# floats; the event is taken only when every segment equals the one learnt, and a tuple of tags
# is learnt only after protobuf decoded a record of it to exactly what the unpack gives.


def many_key(data: bytes, p: int) -> bytes | None:
    """What indexes the learnt layouts: the first fixed segment (summary length, first tag).

    ``data[p]`` should open the summary (``2a L 0a M ...``); None when it does not, or when
    the first value's length M is not a one-byte varint (a first tag over ~118 bytes).
    """
    q = p + 1
    end = min(len(data), p + 4)
    while q < end and data[q] & 0x80:
        q += 1  # the summary's length L, a varint of 1 to 3 bytes
    if q + 2 >= len(data) or data[p] != 0x2A or data[q + 1] != 0x0A or data[q + 2] & 0x80:
        return None
    return data[p : q + 3 + data[q + 2] - 4]


class ManyLayout:
    """The fixed segments of a several-value event after its step varint, for one tuple of tags."""

    __slots__ = ("consts", "size", "tags", "unpack")

    def __init__(self, tags: tuple[str, ...]) -> None:
        from lrwatch.events.encode import SummaryLayout  # the encoder's bytes, written once

        enc = SummaryLayout(tags)
        heads = list(enc.args[0::2])
        heads[0] = enc.summary_head + heads[0]  # type: ignore[operator]
        self.tags = tuple(intern(t) for t in tags)
        self.consts = tuple(heads)
        fmt = "<" + "".join(f"{len(h)}sf" for h in heads)  # type: ignore[arg-type]
        self.unpack = struct.Struct(fmt).unpack_from
        self.size = struct.calcsize(fmt)

    def values(self, data: bytes, p: int) -> tuple[float, ...] | None:
        """The floats of ``data`` (whose step varint ends at ``p``); None if not this layout."""
        if len(data) - p != self.size:
            return None
        parts = self.unpack(data, p)
        return parts[1::2] if parts[0::2] == self.consts else None


def learn_many(
    data: bytes, event: Any, found: list[Scalar], many: dict[bytes, list[ManyLayout]]
) -> None:
    """Remember the layout of ``data`` if protobuf's decode (``found``) is exactly its unpack."""
    split = split_layout(data)
    values = event.summary.value
    if split is None or len(found) != len(values) or sum(map(len, many.values())) >= MAX_LAYOUTS:
        return
    if any(v.WhichOneof("value") != "simple_value" for v in values):
        return
    p = len(data) - len(split[1]) - 4
    if split[0] != event.step:
        return
    key = many_key(data, p)
    if key is None:
        return
    layout = ManyLayout(tuple(s.tag for s in found))
    got = layout.values(data, p)
    want = tuple(s.value for s in found)
    # Compared as bytes, so NaN payloads count too (a NaN record simply teaches nothing).
    if got is not None and struct.pack(f"<{len(got)}d", *got) == struct.pack(
        f"<{len(want)}d", *want
    ):
        many.setdefault(key, []).append(layout)


def decode_learning(
    data: bytes,
    out: list[Scalar],
    layouts: dict[bytes, str],
    parse: Any,
    many: dict[bytes, list[ManyLayout]] | None = None,
) -> None:
    """Decode ``data`` with protobuf into ``out``; remember its key if it has a fast layout."""
    first = len(out)
    event = parse(data)
    decode_event(event, out)
    if len(out) > first + 1 and many is not None:
        learn_many(data, event, out[first:], many)
        return
    if len(out) != first + 1 or len(layouts) >= MAX_LAYOUTS:
        return
    scalar = out[first]
    split = split_layout(data)
    value = event.summary.value[0]
    if split is not None and value.WhichOneof("value") == "simple_value":
        step, key = split
        if step == scalar.step and key == layout_key(value.tag):  # the tag as written
            layouts[key] = scalar.tag


def resync(buf: bytes, pos: int) -> int:
    """Offset in ``buf`` of the next valid-looking header after a bad one at ``pos``."""
    for p in range(pos + 1, len(buf) - 11):
        length, header_crc = HEADER.unpack_from(buf, p)
        if length <= MAX_RECORD and masked_crc(buf[p : p + 8]) == header_crc:
            return p
    return max(pos + 1, len(buf) - 11)  # keep a header that may be split across chunks
