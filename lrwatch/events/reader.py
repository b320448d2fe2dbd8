"""Event files -> :class:`~lrwatch.schema.Scalar` values, incrementally and exactly once.

The contract is TensorBoard's ``EventFileLoader.Load()``: every complete record is yielded once,
reading resumes where it stopped, a generator that is not iterated consumes nothing, and a record
cut short at the end of a growing file means "come back later", never a parse error. A run
directory holds several live files (a restarted trainer opens a new one), so :class:`RunReader`
keeps one :class:`EventFileReader` per file, like TensorBoard's ``directory_loader.py``.

Why the records are framed by hand instead of reusing ``EventFileLoader``: ``bench/
reader_throughput.py`` measures TensorBoard's loader at a few tens of thousands of values per
second without TensorFlow (its pure-Python record reader plus the ``data_compat`` conversion of
every value to a tensor), far too slow to replay a million-scalar run in seconds. Here the
framing is a loop over one buffer with ``struct``, checksums use the C ``crc32c`` package (header
CRCs are cached per record length; data CRCs are always checked), and the payload is parsed by
TensorBoard's own compiled ``event_pb2.Event`` (protobuf upb), except for the one-value
``simple_value`` event, whose exact byte layout is read with ``struct`` once protobuf has
vouched for its tag, and the several-value event, split by one ``struct`` unpack once
protobuf has vouched for its tuple of tags (see :mod:`.decode`). Measured side by side
(``--quick``, CPU time, shared 2-core machine, noisy): one value per event, EventFileLoader
22-28k values/s, this reader 460-770k (20-35x; 220-280k, 10-14x, with protobuf alone); 100 per
event, 40-44k and 2.9-3.1M (70x; 1.16M, 29x, with protobuf per event).

A replaced file (a new inode, or different first bytes) is read again from the start, so its
scalars can be yielded a second time; downstream, :class:`~lrwatch.analysis.history.History` treats
repeated steps as a resumed timeline. A file truncated in place keeps its first bytes: it is
re-framed from offset 0 without yielding again what lay before the cut. Records written after a
truncation but before the next read, and ending before the cut point, can be missed.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import gc
import logging
import os
import stat
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import crc32c
from google.protobuf.message import DecodeError
from tensorboard.compat.proto import event_pb2

from lrwatch.errors import EventFileError, RunGone
from lrwatch.events.decode import (
    FAST_MAX,
    FAST_MIN,
    FOOTER,
    HEADER,
    MASK_DELTA,
    MAX_RECORD,
    SIMPLE_VALUE,
    WALL_TIME,
    ManyLayout,
    decode_learning,
    many_key,
    masked_crc,
    resync,
)
from lrwatch.schema import DAEMON_SUBRUN, Scalar

logger = logging.getLogger(__name__)

_CHUNK = 4 << 20  # bytes per read(): bounds memory on huge files, amortises syscalls
_SIGNATURE = 64  # first bytes of a file remembered to notice a rewrite in place
_RECENT_S = 2.0  # a directory changed this recently is listed on every poll (mtime granularity)
_Chunk = tuple[list[Scalar], list[int], list[int], int]  # see EventFileReader._frames
# Scalar from a (tag, step, wall_time, value) tuple at C speed: skips the NamedTuple's __new__.
_SCALAR = functools.partial(tuple.__new__, Scalar)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic GC while a bulk read allocates a million Scalars.

    Every Scalar is a GC-tracked object, so the collector keeps rescanning the growing result
    list; the benchmark measured bulk reads about 1.5x faster without it. Nothing in a read
    creates cycles, and the previous state is restored.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class EventFileReader:
    """Reads one event file incrementally; each complete record's scalars are yielded once.

    Example::

        reader = EventFileReader(Path("runs/a/events.out.tfevents.1.host"))
        for scalar in reader.read():  # everything so far
            ...
        new = list(reader.read())  # only what was appended since
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._offset = 0  # start of the first record not fully yielded
        self._skip = 0  # scalars of that record already yielded
        self._inode: int | None = None
        self._size = 0  # size at the last stat, to notice a shrink
        self.modified = 0.0  # st_mtime at the last stat: when the file last grew (or changed)
        self._signature = b""  # first bytes, to notice a rewrite in place
        self._suppress = 0  # after a truncation: records ending before this were yielded
        self._warned_corrupt = False
        self._header_crcs: dict[int, int] = {}  # length -> masked CRC of its 8 bytes
        self._layouts: dict[bytes, str] = {}  # fast-layout key -> its (interned) tag
        self._many: dict[bytes, list[ManyLayout]] = {}  # see decode.ManyLayout

    def read(self) -> Generator[Scalar, None, None]:
        """Yield every scalar not yielded before; stopping early loses nothing."""
        for values, ends, marks, _ in self._records(marking=True):
            lo = 0
            for next_offset, hi in zip(ends, marks, strict=True):
                first, lo = lo, hi
                skip = self._skip
                if next_offset <= self._suppress or hi - first <= skip:
                    self._offset, self._skip = next_offset, 0
                    continue
                for i in range(first + skip, hi):
                    # Record the position before handing the value out: a consumer that
                    # stops right after it must not see it again.
                    if i == hi - 1:
                        self._offset, self._skip = next_offset, 0
                    else:
                        self._skip = i + 1 - first
                    yield values[i]

    def read_all(self) -> list[Scalar]:
        """Everything new as one list (what :meth:`RunReader.poll` uses; faster than ``read``)."""
        out: list[Scalar] = []
        with _gc_paused():
            self._read_into(out)
        return out

    def _read_into(self, out: list[Scalar]) -> None:
        # Per-record ends are only needed to drop records from before a truncation point; the
        # first record's already-yielded values are simply the first ``self._skip`` values.
        marking = self._suppress > self._offset
        for values, ends, marks, chunk_end in self._records(marking=marking):
            if chunk_end == self._offset:
                continue  # no complete record in this chunk yet
            # Records ending at or before the truncation point were yielded before the cut.
            dropped = bisect.bisect_right(ends, self._suppress) if marking else 0
            start = marks[dropped - 1] if dropped else self._skip
            out.extend(values[start:] if start else values)
            self._offset, self._skip = chunk_end, 0

    def _records(self, *, marking: bool) -> Iterator[_Chunk]:
        """Yield, per chunk, the records past ``self._offset`` (see :meth:`_frames`).

        Changes no position itself: the callers advance it as they hand values out.
        """
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            logger.debug("%s vanished", self.path)
            return
        except OSError as e:
            raise EventFileError(f"cannot stat {self.path}: {e}") from e
        self._check_identity(st)
        self.modified = st.st_mtime
        if st.st_size <= self._offset:
            return  # the common idle poll: one stat, nothing new
        try:
            f = open(self.path, "rb")  # closed by the with below
        except FileNotFoundError:
            return
        except OSError as e:
            raise EventFileError(f"cannot read {self.path}: {e}") from e
        with f:
            if not self._same_start(f, st.st_size):
                self._restart("was rewritten in place", st)
                self._same_start(f, st.st_size)
            f.seek(self._offset)
            yield from self._frames(f, marking=marking)

    def changed(self) -> bool:
        """Whether the file's size or identity differs from the last read (one ``stat``)."""
        try:
            st = os.stat(self.path)
        except OSError:
            return True
        return st.st_size != self._size or st.st_ino != self._inode

    def _check_identity(self, st: os.stat_result) -> None:
        if self._inode is not None and st.st_ino != self._inode:
            self._restart("was replaced", st)
        elif st.st_size < self._size or st.st_size < self._offset:
            self._suppress = min(st.st_size, max(self._offset, self._suppress))
            self._restart("was truncated", st, suppress=True)
        self._inode = st.st_ino
        self._size = st.st_size

    def _same_start(self, f: Any, size: int) -> bool:
        """Compare the remembered first bytes, and remember more while the file is young."""
        head = os.pread(f.fileno(), min(size, _SIGNATURE), 0)
        same = head.startswith(self._signature)
        self._signature = head
        return same

    def _restart(self, why: str, st: os.stat_result, *, suppress: bool = False) -> None:
        logger.warning("%s %s; reading it again from the start", self.path, why)
        self._offset, self._skip, self._signature = 0, 0, b""
        self._inode, self._size = st.st_ino, st.st_size
        if not suppress:
            self._suppress = 0

    def _frames(self, f: Any, *, marking: bool) -> Iterator[_Chunk]:
        """Split the bytes after ``self._offset`` into records, decoded one chunk at a time.

        Yields, per chunk read, (values, ends, marks, chunk_end): with ``marking``, record ``i``
        ends at file offset ``ends[i]`` and holds ``values[marks[i-1]:marks[i]]``; without it
        both lists stay empty (their two appends were 16% of a bulk read). ``chunk_end`` is the
        file offset after the last complete record. Flat lists rather than one per record, and
        the fast layout of :mod:`.decode` decoded inline (no call per record): this
        loop is the benchmark's hot path, about 1.3 us per one-value record.
        """
        base = self._offset  # file offset of buf[0]
        buf = b""
        parse, crc, new = event_pb2.Event.FromString, crc32c.crc32c, tuple.__new__
        unpack_header, unpack_footer = HEADER.unpack_from, FOOTER.unpack_from
        crcs, layouts, wall, value = self._header_crcs, self._layouts, WALL_TIME, SIMPLE_VALUE
        many = self._many
        while chunk := f.read(_CHUNK):
            buf = buf + chunk if buf else chunk
            n, pos = len(buf), 0
            values: list[Scalar] = []
            ends: list[int] = []
            marks: list[int] = []
            add = values.append
            while pos + 12 <= n:
                length, header_crc = unpack_header(buf, pos)
                if crcs.get(length) != header_crc:
                    if masked_crc(buf[pos : pos + 8]) != header_crc or length > MAX_RECORD:
                        self._warn_corrupt(base + pos, "header CRC mismatch")
                        pos = resync(buf, pos)
                        if marking:
                            ends.append(base + pos)
                            marks.append(len(values))
                        continue
                    crcs[length] = header_crc
                end = pos + 12 + length
                if end + 4 > n:
                    break  # partial record: complete it with the next chunk or a later read
                data = buf[pos + 12 : end]
                c, (footer,) = crc(data), unpack_footer(buf, end)
                if (((c >> 15) | (c << 17)) + MASK_DELTA) & 0xFFFFFFFF != footer:
                    self._warn_corrupt(base + pos, "data CRC mismatch")
                else:
                    tag, done = None, False  # the fast layouts (decode.split_layout, inlined)
                    if length >= FAST_MIN and data[0] == 0x09 and data[9] == 0x10:
                        step = b = data[10]
                        p = 11
                        if b >= 0x80:  # steps below 2**21 unrolled: 1.1x on the benchmark
                            b = data[11]
                            step = (step & 0x7F) | (b & 0x7F) << 7
                            p = 12
                            if b >= 0x80:
                                b = data[12]
                                step |= (b & 0x7F) << 14
                                p, shift = 13, 21
                                while b >= 0x80 and p < 19:
                                    b = data[p]
                                    step |= (b & 0x7F) << shift
                                    shift += 7
                                    p += 1
                        if b < 0x80:
                            tag = layouts.get(data[p:-4]) if length <= FAST_MAX else None
                            if tag is None and (kinds := many.get(many_key(data, p) or b"")):
                                done = self._many_values(data, p, step, kinds, values)
                    if tag is not None:
                        add(new(Scalar, (tag, step, wall(data, 1)[0], value(data, length - 4)[0])))
                    elif not done:
                        try:
                            decode_learning(data, values, layouts, parse, many)
                        except DecodeError:
                            self._warn_corrupt(base + pos, "undecodable event")
                pos = end + 4
                if marking:
                    ends.append(base + pos)
                    marks.append(len(values))
            yield values, ends, marks, base + pos
            base += pos
            buf = buf[pos:]

    @staticmethod
    def _many_values(
        data: bytes, p: int, step: int, kinds: list[ManyLayout], out: list[Scalar]
    ) -> bool:
        """Append the values of a several-value event if one of ``kinds`` is its layout."""
        for kind in kinds:
            floats = kind.values(data, p)
            if floats is not None:
                n = len(floats)
                t = WALL_TIME(data, 1)[0]
                out += map(_SCALAR, zip(kind.tags, [step] * n, [t] * n, floats, strict=True))
                return True
        return False

    def _warn_corrupt(self, where: int, what: str) -> None:
        if not self._warned_corrupt:
            self._warned_corrupt = True
            logger.warning(
                "%s: %s near byte %d; skipping to the next record", self.path, what, where
            )
        else:
            logger.debug("%s: %s near byte %d", self.path, what, where)

    def state_dict(self) -> dict[str, Any]:
        """Position and identity, so a restarted daemon resumes without re-reading."""
        return {
            "offset": self._offset,
            "skip": self._skip,
            "inode": self._inode,
            "size": self._size,
            "signature": self._signature.hex(),
            "suppress": self._suppress,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._offset = int(state["offset"])
        self._skip = int(state.get("skip", 0))
        self._inode = state.get("inode")
        self._size = int(state.get("size", 0))
        self._signature = bytes.fromhex(state.get("signature", ""))
        self._suppress = int(state.get("suppress", 0))


def _is_event_file(entry: os.DirEntry[str]) -> bool:
    return "tfevents" in entry.name and entry.is_file()


class RunReader:
    """Reads every event file directly inside one run directory, new files included.

    Files are read in name order (TensorBoard names them by creation time), subdirectories are
    runs of their own (see :func:`find_runs`). A poll that finds nothing new costs one ``stat``
    of the directory (it is listed again only when its mtime changed) plus one per file.

    Example::

        run = RunReader(Path("runs/a"))
        history.extend(run.poll())  # everything so far, then only what is new
    """

    def __init__(
        self, run_dir: Path, *, reader_factory: type[EventFileReader] = EventFileReader
    ) -> None:
        self.run_dir = Path(run_dir)
        # A seam for tests and wrappers, as TensorBoard's DirectoryLoader takes a loader factory.
        self._factory = reader_factory
        self._readers: dict[str, EventFileReader] = {}
        self._names: list[str] = []  # event files at the last listing
        self._dir_mtime_ns = -1  # directory mtime at the last listing

    def poll(self) -> list[Scalar]:
        """Everything written since the last poll, across the run's event files."""
        names = self._event_files()
        for gone in self._readers.keys() - set(names):
            logger.debug("%s disappeared from %s", gone, self.run_dir)
            del self._readers[gone]
        out: list[Scalar] = []
        for name in names:
            reader = self._readers.get(name)
            if reader is None:
                logger.debug("new event file %s in %s", name, self.run_dir)
                reader = self._readers[name] = self._factory(self.run_dir / name)
            out.extend(reader.read_all())
        return out

    def has_news(self) -> bool:
        """Whether :meth:`poll` could find anything new, from ``stat`` calls alone.

        True when the directory changed (a new file; or it is gone, which poll reports) or a
        known file changed size or identity. What it cannot see, a file rewritten in place to
        the same size, a later poll still finds.
        """
        try:
            st = os.stat(self.run_dir)
        except OSError:
            return True
        if st.st_mtime_ns != self._dir_mtime_ns or time.time() - st.st_mtime < _RECENT_S:
            return True
        for reader in self._readers.values():
            if reader.changed():
                return True
        return False

    def _event_files(self) -> list[str]:
        """Names of the run's event files; the directory is listed again only when it changed."""
        try:
            st = os.stat(self.run_dir)
            if not stat.S_ISDIR(st.st_mode):
                raise NotADirectoryError(self.run_dir)
            # Creating or removing a file changes the directory's mtime. Two changes within the
            # filesystem's timestamp granularity can leave it equal, so a directory changed in
            # the last few seconds is always listed again.
            if st.st_mtime_ns != self._dir_mtime_ns or time.time() - st.st_mtime < _RECENT_S:
                entries = os.scandir(self.run_dir)
                self._names = sorted(e.name for e in entries if _is_event_file(e))
                self._dir_mtime_ns = st.st_mtime_ns
        except (FileNotFoundError, NotADirectoryError):
            raise RunGone(f"run directory {self.run_dir} no longer exists") from None
        return self._names

    @property
    def modified(self) -> float:
        """When an event file of the run last changed, as of the last poll (0.0: never seen)."""
        return max((r.modified for r in self._readers.values()), default=0.0)

    def state_dict(self) -> dict[str, Any]:
        return {"files": {name: r.state_dict() for name, r in self._readers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._readers = {}
        for name, file_state in state.get("files", {}).items():
            reader = self._readers[name] = self._factory(self.run_dir / name)
            reader.load_state_dict(file_state)


def find_runs(logdir: Path) -> list[Path]:
    """Every directory under ``logdir`` (itself included) that holds event files, sorted.

    The daemon's own ``lrwatch_daemon`` sub-runs and everything below them are left out, so the
    daemon never analyses its own markers.
    """
    logdir = Path(logdir)
    if not logdir.is_dir():
        raise RunGone(f"log directory {logdir} does not exist")
    runs = []
    for root, dirs, files in os.walk(logdir):
        dirs[:] = [d for d in dirs if d != DAEMON_SUBRUN]
        if any("tfevents" in f for f in files):
            runs.append(Path(root))
    return sorted(runs)


def read_run(run_dir: Path) -> list[Scalar]:
    """A run's whole history, in file-name order then file order."""
    if not Path(run_dir).is_dir():
        raise RunGone(f"run directory {run_dir} does not exist")
    return RunReader(Path(run_dir)).poll()
