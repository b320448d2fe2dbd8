"""TensorBoard event files: the hand-written encoding and writer thread, and the reader.

The hook writes through :mod:`.writer` (framing in :mod:`.encode`, disk in :mod:`.sink`); the
daemon and the views read through :mod:`.reader` (decoding in :mod:`.decode`). Nothing here
imports torch, so both sides can use it.
"""
