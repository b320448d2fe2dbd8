"""Which log directories are URLs, and where their local copies live (stdlib only).

A URL's local copy is ``<root>/<scheme>/<bucket>/<key...>``: the spool of a training process
(``$LRWATCH_SPOOL``, else ``$XDG_CACHE_HOME/lrwatch/spool``, else ``~/.cache/lrwatch/spool``)
or the daemon's mirror (``--state-dir``, else ``$LRWATCH_STATE_DIR``, else
``$XDG_STATE_HOME/lrwatch``, else ``~/.local/state/lrwatch``). One URL, one local directory:
a trainer resumed on the same host finds what it had not uploaded yet, and a restarted daemon
its state and audit log.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from lrwatch.errors import ConfigError

_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>.*)$")


def is_url(logdir: object) -> bool:
    """True for ``scheme://...`` strings other than ``file://`` (those are local paths)."""
    if not isinstance(logdir, str):
        return False
    match = _URL.match(logdir)
    return match is not None and match["scheme"].lower() != "file"


def local_copy(root: Path, url: str) -> Path:
    """``root/scheme/bucket/key...`` for ``url``; ConfigError for a URL that is not one."""
    match = _URL.match(url)
    if match is None:
        raise ConfigError(f"{url!r} is not a URL like s3://bucket/prefix")
    parts = [p for p in match["rest"].split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise ConfigError(f"{url!r}: give a bucket and an optional prefix, without . or ..")
    return root.joinpath(match["scheme"].lower(), *parts)


def spool_dir(url: str) -> Path:
    """Where a training process writing to ``url`` keeps its files before and after upload."""
    root = os.environ.get("LRWATCH_SPOOL") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lrwatch", "spool"
    )
    return local_copy(Path(root), url)


def default_state_dir() -> Path:
    """The daemon's default ``--state-dir`` (its mirrors, state and audit logs), also where
    ``status`` and ``analyze`` keep their copies: ``$LRWATCH_STATE_DIR`` if set."""
    if os.environ.get("LRWATCH_STATE_DIR"):
        return Path(os.environ["LRWATCH_STATE_DIR"])
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "lrwatch"
