"""The LR range test (``lrwatch.find_lr``): the sweep, the suggestion rules and the plot."""
