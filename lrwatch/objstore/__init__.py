"""Run directories in object storage (``s3://``, ``gs://``, ... through fsspec).

Object stores have no append and no file events, so neither side talks to the bucket as if it
were a disk. Both keep a local directory that the rest of lrwatch uses exactly as before:

- the hook writes into a **spool** directory (:func:`.location.spool_dir`) and
  :class:`.upload.Uploader` copies it up on its own thread: event files as a sequence of
  segments (:mod:`.segments`), the applied-actions record, and the control file down;
- the daemon reads a **mirror** (:class:`.mirror.Mirror`): new event bytes come down by ranged
  reads, its control files, audit logs and TensorBoard markers go up.

fsspec (and s3fs/gcsfs) is imported only by :mod:`.store`, on first use: a local run never
loads it (``tests/test_api.py``). Install with ``pip install 'lrwatch[s3]'``.
"""
