"""The event file itself, as the writer thread sees it: open, append, survive the disk.

Every failure here is expected and local: it logs one warning per kind, drops the bytes it could
not write and reports ``False``; the next write tries again. Only the writer thread calls
:meth:`EventSink.write`, so there is no locking.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from lrwatch.events.encode import file_version_record

logger = logging.getLogger("lrwatch.events.writer")

RETRY_SECS = 2.0  # how often to retry opening an unwritable logdir: cheap, and not a busy loop


class EventSink:
    """One append-only event file in ``logdir``, re-created in place if the logdir vanishes."""

    def __init__(self, logdir: Path, namer: Callable[[str], str], suffix: str) -> None:
        self.logdir = logdir
        self._namer = namer
        self._suffix = suffix
        self.path = logdir / namer(suffix)
        self.ok = True
        self._fd: int | None = None
        self._size = 0  # bytes of whole records in the file: a failed write is cut back to it
        self._retry_at = 0.0
        self._warned: set[str] = set()

    def open(self) -> bool:
        """Create the logdir and the file and write its header; False (warned) if impossible."""
        if time.monotonic() < self._retry_at:
            return False
        try:
            os.makedirs(self.logdir, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            self._retry_at = time.monotonic() + RETRY_SECS
            self._fail(exc)
            return False
        self._fd, self._size = fd, os.fstat(fd).st_size
        if self._size == 0:
            try:
                self._write_all(file_version_record(time.time()))
            except OSError as exc:  # e.g. a full disk: retry this same file later
                self.close()
                self._retry_at = time.monotonic() + RETRY_SECS
                self._fail(exc)
                return False
        return True

    def write(self, data: bytes) -> bool:
        """Append ``data`` (whole records); True when it reached the file."""
        if self._fd is None and not self.open():
            return False
        try:
            self._write_all(data)
            if self._vanished():
                # On Linux writes into an unlinked file still succeed, so the first sign of an
                # rmtree'd logdir is a link count of 0: start a new file and write this batch again.
                self._warn_once(
                    "gone",
                    "lrwatch's event file %s was deleted (logdir removed?): re-creating %s and "
                    "writing on in a new event file",
                    self.path,
                    self.logdir,
                )
                self.close()
                self.path = self.logdir / self._namer(self._suffix)
                if not self.open():
                    return False
                self._write_all(data)
        except OSError as exc:
            self._fail(exc)
            return False
        if not self.ok:
            logger.info("lrwatch writes its event file %s again", self.path)
            self.ok = True
        return True

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)
            except OSError:
                pass

    def _vanished(self) -> bool:
        assert self._fd is not None
        return os.fstat(self._fd).st_nlink == 0

    def _write_all(self, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError:
            # A partial record at the end would stall every reader ("wait for the rest"): cut
            # the file back to its last whole record so later appends stay readable.
            try:
                os.ftruncate(self._fd, self._size)
            except OSError:
                pass
            raise
        self._size += len(data)

    def _fail(self, exc: OSError) -> None:
        self.ok = False
        what = "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else str(exc)
        self._warn_once(
            f"errno{exc.errno}",
            "lrwatch cannot write its event file %s (%s): dropping lrwatch scalars until it can; "
            "training continues",
            self.path,
            what,
        )

    def _warn_once(self, key: str, msg: str, *args: object) -> None:
        if key in self._warned:
            logger.debug(msg, *args)
        else:
            self._warned.add(key)
            logger.warning(msg, *args)
