"""``lrwatch.lightning``: the public name of :mod:`lrwatch.integrations.lightning`."""

from lrwatch.integrations.lightning import LRWatch

__all__ = ["LRWatch"]
