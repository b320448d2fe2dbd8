"""Event files in object storage: a sequence of segment objects that TensorBoard reads as one run.

An object cannot be appended to. Re-uploading a whole event file at every upload costs its whole
size each time, which grows without bound over a run; one object per upload leaves tens of
thousands of objects for every reader to list and open. So a local event file goes up as
segments: the open segment is re-uploaded whole (it only grows) until it holds
:data:`SEGMENT_BYTES`, then it is sealed and the next upload starts the next one
(``bench/objstore_cost.py`` measures the upload cost against whole-file re-uploads).

Each segment holds whole TFRecords only, so TensorBoard reads each one as an event file, and
their names sort in write order (``<name>.s000001.lrwatch``), which is the order TensorBoard
and lrwatch read the files of a run in. A segment is uploaded for the last time before the next
one exists, so a reader that sees segment k+1 knows segment k is final: the daemon's mirror
concatenates them back into the trainer's file, byte for byte.
"""

from __future__ import annotations

import re
import struct

from lrwatch.schema import HOOK_FILE_SUFFIX

SEGMENT_BYTES = 1 << 20  # see the module docstring; bench/objstore_cost.py --segment-bytes
_FRAME = struct.Struct("<Q")  # a TFRecord: length u64, crc u32, data, crc u32
_SEGMENT = re.compile(r"^(?P<base>.*tfevents.*)\.s(?P<index>\d{6})(?P<suffix>(?:\.lrwatch)?)$")


def segment_name(name: str, index: int) -> str:
    """The object name of segment ``index`` of the local event file ``name``."""
    if name.endswith(HOOK_FILE_SUFFIX):
        return f"{name[: -len(HOOK_FILE_SUFFIX)]}.s{index:06d}{HOOK_FILE_SUFFIX}"
    return f"{name}.s{index:06d}"


def split_segment(name: str) -> tuple[str, int] | None:
    """(local event file name, segment index) of a segment object's name; None if not one."""
    match = _SEGMENT.match(name)
    if match is None:
        return None
    return match["base"] + match["suffix"], int(match["index"])


def whole_records(data: bytes | memoryview, *, enough: int | None = None) -> int:
    """Length of the longest prefix of ``data`` made of whole TFRecords (framing only), or of
    the shortest one of at least ``enough`` bytes.

    The local file may end in a record the writer thread is still appending; it waits for the
    next upload. Checksums are the readers' business: this only finds the boundaries.
    """
    offset, size = 0, len(data)
    stop = size if enough is None else enough
    while offset + 12 <= size and offset < stop:
        (length,) = _FRAME.unpack_from(data, offset)
        end = offset + 16 + length
        if end > size:
            break
        offset = end
    return offset
