"""Detectors: pure rules from one run's series to ``schema.Finding | None``.

Each detector is a frozen dataclass whose fields are its documented parameters, validated when
it is built (``errors.ConfigError`` names the fix), with one ``check`` method that judges the
series at its last point (the current step). No I/O, no clock, no hidden state: the analyzer
keeps the bounded windows (``steps`` int64, ``values`` float64, oldest first) and calls ``check``
when a new point arrives. A degenerate window (too short, constant, NaN) gives ``None``.

Modules (import from them directly; this package re-exports nothing):

=============  =====================================  ===========================================
module         class                                  rule and main defaults
=============  =====================================  ===========================================
nonfinite      ``NonfiniteDetector``                  NaN/Inf at the last point, or the
                                                      nonfinite flag > 0.5; critical
explosion      ``ExplosionDetector``                  robust z (median/MAD, log space) >= 6 and
                                                      >= 2x median over 100 points; critical when
                                                      3 in a row and >= 10x (or z >= 20), or 4
                                                      rises in a row totalling >= 100x; or a
                                                      significant climb over 8 points ending
                                                      >= 3x median (z >= 2, last 3 >= 2x)
plateau        (owned by the policy engineer)         no improvement for ``patience`` checks;
                                                      ReduceLROnPlateau-compatible; trend mode
oscillation    ``OscillationDetector``                no fall over 400 points (with a high
                                                      ratio: none larger than the jitter band),
                                                      no trend and jitter over the last 100
                                                      (Kendall p >= 0.05), corroborated by update
                                                      ratio >= 5e-3 or turning points z >= 2.33;
                                                      ``mild``/``strong`` in evidence
ratio          ``RatioDetector``, ``weight_matrix_     median update/weight ratio over a full
               tags``, ``aggregate``                  window of 50 points > 1e-2 (ratio_high;
                                                      info while the loss clearly falls) or
                                                      < 1e-4 (ratio_low)
slow_progress  ``SlowProgressDetector``               the loss's last third of the run still
                                                      falls >= 0.5x as fast as its first third
                                                      (both Kendall p < 0.01; info)
overfit        ``OverfitDetector``                    validation worse than its best by 1% for 3
                                                      evaluations while training loss falls
amp            ``AmpDetector``                        non-finite loss, scale < 1, >= 20% skipped
                                                      steps, or 4 halvings without growth
schedule       ``ScheduleDetector`` ->                LR phase over 20 points: warmup, constant,
               ``SchedulePhase``                      decaying, cut (>= 20% drop), unknown
=============  =====================================  ===========================================

``_window`` holds the shared robust statistics (median/MAD, Kendall's tau as a numpy
Mann-Kendall test checked against scipy, lag-1 autocorrelation), all total.
"""
