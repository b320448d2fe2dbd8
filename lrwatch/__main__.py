"""``python -m lrwatch`` is the ``lrwatch`` command."""

from lrwatch.cli import main

main()
