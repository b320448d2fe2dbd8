"""The policy: findings -> interventions (LR cut, clip, stop), each with a reason.

Pure rules and counters, no I/O: the response table (:mod:`.responses`), the cut budget and floor
(:mod:`.budget`), the clip threshold estimate (:mod:`.autoclip`) and the state that survives
restarts (:mod:`.state`), driven by :class:`~lrwatch.policy.policy.Policy`.
"""
