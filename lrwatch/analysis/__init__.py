"""Analysis: scalars -> findings -> decisions, with no side effects.

:class:`~lrwatch.analysis.analyzer.RunAnalyzer` keeps bounded history per tag (:mod:`.history`),
learns which tag plays which role (:mod:`.roles`, :mod:`.run_tags`), runs the detectors
(:mod:`.detectors`, gated per role in :mod:`.role_checks`) and hands findings to the policy.
It runs in the daemon and in ``lrwatch analyze``; never in the training process.
"""
