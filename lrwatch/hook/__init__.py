"""The hook: everything that runs inside the training process.

``lrwatch.watch`` attaches a :class:`~lrwatch.hook.monitor.Monitor` to the optimizer step hooks.
It captures the loss (:mod:`.capture`), measures norms and update ratios on device
(:mod:`.stats`, :mod:`.measure`; on every rank of a sharded run, :mod:`.steps`) at a cadence
(:mod:`.cadence`), batches per-step rows (:mod:`.rows`) for the writer thread
(:mod:`.recorder`, :mod:`lrwatch.events.writer`), and applies control-file actions at step
boundaries (:mod:`.controller`, :mod:`.applied`) agreed across ranks (:mod:`.ranks`).
Rules for this package: never block or sync a step, never raise into the user's
loop, never import scipy, the analysis, the policy, the daemon or the views (checked by
import-linter in CI).
"""
