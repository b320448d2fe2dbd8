"""``lrwatch.hf``: the public name of :mod:`lrwatch.integrations.hf`."""

from lrwatch.integrations.hf import LRWatchCallback

__all__ = ["LRWatchCallback"]
