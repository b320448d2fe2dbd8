"""What a person reads: ``lrwatch status``, ``lrwatch report`` and the ``analyze`` table.

Everything here reads files a run directory already holds (event files, audit log, control and
applied state); nothing here writes to a run or imports torch.
"""
