"""The daemon (``lrwatch serve``): watch run directories, analyze, act, record.

:mod:`.serve` is the watch loop; :mod:`.watched_run` holds one run's persistent state and its
per-pass job; :mod:`.rails` bounds what apply mode may do; :mod:`.outputs` writes the audit log,
TensorBoard markers and console lines; :mod:`.notify` runs the user's hook executables and
:mod:`.hook_jobs` keeps their runs as jobs in the audit log (owed, retried, rerun on restart);
:mod:`.tb_layout` writes the TensorBoard custom-scalars layout; :mod:`.tally` counts for the
periodic summary and the ``--json`` stream. Runs outside the training process and never imports
torch.
"""
