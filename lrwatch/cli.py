"""The ``lrwatch`` command: thin click subcommands that parse options and call one function each.

Heavy imports stay inside the subcommands so ``lrwatch --help`` is instant.
"""

from __future__ import annotations

import logging

import click

from lrwatch import __version__
from lrwatch.errors import LrwatchError

logger = logging.getLogger(__name__)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "LRWATCH"})
@click.version_option(__version__, prog_name="lrwatch")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Training-run monitor and learning-rate advisor for PyTorch."""
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def fail(err: LrwatchError) -> None:
    """Show an lrwatch error as one line and exit with code 1 (the CLI's one broad catch)."""
    raise click.ClickException(str(err)) from err


# Subcommands are added below by their owners: analyze, apply, serve.
