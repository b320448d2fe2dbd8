"""The ``lrwatch`` command: thin click subcommands that parse options and call one function each.

Heavy imports stay inside the subcommands so ``lrwatch --help`` is instant.
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any

import click

from lrwatch import __version__
from lrwatch.errors import LrwatchError

logger = logging.getLogger(__name__)


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "LRWATCH"}
)
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


# -------------------------------------------------------------------------------- analyze (H6)
def _setting(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, Any]:
    """``--set TABLE.KEY=VALUE`` (VALUE in TOML syntax, bare words as strings) -> nested dict."""
    import tomllib

    out: dict[str, Any] = {}
    for item in values:
        name, sep, raw = item.partition("=")
        table, dot, key = name.strip().partition(".")
        if not (sep and dot and table and key):
            raise click.BadParameter(f"{item!r}: use TABLE.KEY=VALUE, e.g. explosion.z_warning=8")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        out.setdefault(table, {})[key.strip()] = value
    return out


@main.command()
@click.argument("run_dir", type=click.Path(path_type=pathlib.Path))
@click.option("--json", "as_json", is_flag=True, help="Print the JSON document instead of a table.")
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path),
    help="TOML file with [detector] and [policy] tables (see README).",
)
@click.option(
    "--metric", metavar="TAG", help="Monitored metric  [default: validation loss, else the loss]"
)
@click.option("--patience", type=click.IntRange(min=1), help="Plateau patience, in checks.")
@click.option("--min-lr", type=click.FloatRange(min=0.0), help="Policy: never advise below.")
@click.option(
    "--set",
    "settings",
    multiple=True,
    callback=_setting,
    metavar="TABLE.KEY=VALUE",
    help="Any config setting, e.g. --set explosion.z_warning=8 (repeatable).",
)
def analyze(
    run_dir: pathlib.Path,
    as_json: bool,
    config_file: pathlib.Path | None,
    metric: str | None,
    patience: int | None,
    min_lr: float | None,
    settings: dict[str, Any],
) -> None:
    """Replay RUN_DIR's history through the detectors and the policy; print what they say."""
    from lrwatch.analyze import analyze_run, format_table
    from lrwatch.config import load_config, merge
    from lrwatch.errors import ConfigError

    overrides: dict[str, Any] = merge(settings, {})
    if metric is not None:
        overrides["metric"] = metric
    if patience is not None:
        overrides = merge(overrides, {"plateau": {"patience": patience}})
    if min_lr is not None:
        overrides = merge(overrides, {"policy": {"min_lr": min_lr}})
    try:
        config = load_config(config_file, overrides=overrides)
    except ConfigError as err:
        raise click.UsageError(str(err)) from err
    try:
        analysis = analyze_run(run_dir, config)
    except LrwatchError as err:
        fail(err)
    if as_json:
        click.echo(json.dumps(analysis.to_json(), indent=2))
    else:
        click.echo(format_table(analysis))


# ---------------------------------------------------------------------------------- apply (H7)
def _lr_cut(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    from lrwatch.schema import ALLOWED_LR_FACTORS

    if value is not None and value not in ALLOWED_LR_FACTORS:
        raise click.BadParameter(f"{value} is not one of {', '.join(map(str, ALLOWED_LR_FACTORS))}")
    return value


def _max_norm(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    import math

    if value is not None and not (math.isfinite(value) and value > 0):
        raise click.BadParameter(f"{value} is not a finite number > 0")
    return value


@main.command()
@click.argument("run_dir", type=click.Path(path_type=pathlib.Path))
@click.option("--lr-cut", type=int, callback=_lr_cut, help="Divide the LR by N (2, 5 or 10).")
@click.option("--clip", type=float, callback=_max_norm, help="Clip gradients at this max norm.")
@click.option("--stop", is_flag=True, help="Make the run stop (mon.should_stop becomes true).")
@click.option(
    "--undo", type=click.IntRange(min=1), help="Undo the earlier cut or clip with this id."
)
@click.option("--reason", default="", help="Why, for the audit trail.")
def apply(
    run_dir: pathlib.Path,
    lr_cut: int | None,
    clip: float | None,
    stop: bool,
    undo: int | None,
    reason: str,
) -> None:
    """Append one action to RUN_DIR's control file; the running job applies it at a step."""
    from lrwatch.control import append_action
    from lrwatch.errors import ConfigError
    from lrwatch.schema import ActionKind

    chosen = {
        ActionKind.LR_CUT: lr_cut is not None,
        ActionKind.CLIP: clip is not None,
        ActionKind.STOP: stop,
        ActionKind.UNDO: undo is not None,
    }
    kinds = [kind for kind, given in chosen.items() if given]
    if len(kinds) != 1:
        raise click.UsageError("give exactly one of --lr-cut, --clip, --stop, --undo")
    try:
        action = append_action(
            run_dir, action=kinds[0], factor=lr_cut, max_norm=clip, target=undo,
            reason=reason, source="human",
        )  # fmt: skip
    except ConfigError as err:
        raise click.UsageError(str(err)) from err
    except LrwatchError as err:
        fail(err)
    except OSError as err:  # a full disk or a read-only run: one line, the file left as it was
        raise click.ClickException(f"{run_dir}: control file not written: {err}") from err
    click.echo(json.dumps(action.to_json()))


# ---------------------------------------------------------------------------------- serve (H8)
@main.command()
@click.argument(
    "logdirs",
    nargs=-1,
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=pathlib.Path),
)
@click.option(
    "--apply",
    "apply_",
    is_flag=True,
    envvar="LRWATCH_SERVE_APPLY",  # the automatic name would end in "_"
    help="Act through control files, not only recommend.",
)
@click.option(
    "--poll",
    type=click.FloatRange(min=0.05),
    metavar="SECONDS",
    help="Poll every SECONDS instead of watching files (network filesystems).",
)
@click.option("--once", is_flag=True, help="Process what is there now, then exit.")
@click.option(
    "--config",
    "config_file",
    envvar="LRWATCH_SERVE_CONFIG",
    type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path),
    help="TOML file with the analyzer's settings (as for analyze).",
)
@click.option("--metric", help="Monitored metric tag  [default: validation loss, else loss]")
@click.option(
    "--hook",
    "hooks",
    multiple=True,
    envvar="LRWATCH_SERVE_HOOK",
    type=click.Path(path_type=pathlib.Path),
    help="Executable run with each decision as JSON on stdin (repeatable).",
)
@click.option(
    "--hook-timeout",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Seconds before a hook's process group is stopped.",
)
@click.option(
    "--min-lr",
    default=1e-8,
    show_default=True,
    type=click.FloatRange(min=0.0),
    help="Apply mode: never cut the effective LR below this.",
)
@click.option(
    "--cooldown",
    default=100,
    show_default=True,
    type=click.IntRange(min=0),
    help="Apply mode: steps between automatic decisions.",
)
@click.option(
    "--budget",
    default=3,
    show_default=True,
    type=click.IntRange(min=0),
    help="Apply mode: automatic decisions per window; past it, only recommend.",
)
@click.option(
    "--window",
    default=1000,
    show_default=True,
    type=click.IntRange(min=1),
    help="Apply mode: the budget's window, in steps.",
)
def serve(
    logdirs: tuple[pathlib.Path, ...],
    apply_: bool,
    poll: float | None,
    once: bool,
    config_file: pathlib.Path | None,
    metric: str | None,
    hooks: tuple[pathlib.Path, ...],
    hook_timeout: float,
    min_lr: float,
    cooldown: int,
    budget: int,
    window: int,
) -> None:
    """Watch the runs under LOGDIRS (and runs that appear later), and advise or act on them."""
    import functools

    from lrwatch.analyze import RunAnalyzer
    from lrwatch.config import load_config
    from lrwatch.errors import ConfigError
    from lrwatch.notify import HookRunner, validate_hooks
    from lrwatch.rails import Rails
    from lrwatch.serve import Daemon, serve_forever

    # Decisions and the runs being watched are what the daemon is for: show them without -v.
    for name in ("lrwatch.report", "lrwatch.serve"):
        logging.getLogger(name).setLevel(min(logging.INFO, logging.getLogger().level))
    try:
        config = load_config(config_file, overrides={} if metric is None else {"metric": metric})
    except ConfigError as err:
        raise click.UsageError(str(err)) from err
    try:
        runner = HookRunner(validate_hooks(hooks), timeout=hook_timeout)
    except ConfigError as err:
        raise click.BadParameter(str(err), param_hint="--hook") from err
    rails = Rails(min_lr=min_lr, cooldown=cooldown, budget=budget, window=window)
    # The detectors import scipy.stats lazily; paying that (seconds on a busy machine) now keeps
    # it off the first decision's latency.
    import scipy.stats  # noqa: F401

    daemon = Daemon(
        logdirs,
        mode="apply" if apply_ else "recommend",
        analyzer_factory=functools.partial(RunAnalyzer, config),
        rails=rails,
        hooks=runner,
    )
    try:
        if once:
            taken = daemon.process()
            click.echo(f"{len(daemon.runs)} runs, {sum(map(len, taken.values()))} decisions")
        else:
            serve_forever(daemon, poll=poll)
    except LrwatchError as err:
        fail(err)
    finally:
        daemon.close()
        runner.close()


# ------------------------------------------------------------------------- status, report (H12)
@main.command()
@click.argument("logdir", type=click.Path(exists=True, file_okay=False, path_type=pathlib.Path))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per run.")
@click.option(
    "--stale-after",
    default=300.0,
    show_default=True,
    type=click.FloatRange(min=0.0),
    metavar="SECONDS",
    help="A run with no new event for this long is 'stale'.",
)
def status(logdir: pathlib.Path, as_json: bool, stale_after: float) -> None:
    """One line per run under LOGDIR: health, LR, cut, last finding and decision, last step."""
    from lrwatch.status import collect_status, format_status

    try:
        statuses = collect_status(logdir, stale_after=stale_after)
    except LrwatchError as err:
        fail(err)
    if as_json:
        click.echo(json.dumps([s.to_json() for s in statuses], indent=2))
    else:
        click.echo(format_status(statuses, logdir=logdir))


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=pathlib.Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=pathlib.Path),
    default=pathlib.Path("report.png"),
    show_default=True,
    help="Picture (.png, .svg, .pdf) or self-contained page (.html).",
)
def report(run_dir: pathlib.Path, output: pathlib.Path) -> None:
    """Draw RUN_DIR: loss, LR, grad norm, update ratio, with every finding and decision marked."""
    from lrwatch.errors import ConfigError
    from lrwatch.report_page import PICTURE_SUFFIXES

    if output.suffix.lower() not in (*PICTURE_SUFFIXES, ".html", ".htm"):
        raise click.BadParameter("use a .png, .svg, .pdf or .html file name", param_hint="-o")
    try:
        from lrwatch.report_page import write_report

        data = write_report(run_dir, output)
    except ConfigError as err:  # matplotlib missing: say how to install it
        raise click.UsageError(str(err)) from err
    except LrwatchError as err:
        fail(err)
    n_d = sum(m.kind == "decision" for m in data.markers)
    click.echo(f"{output}: {len(data.markers) - n_d} findings, {n_d} decisions")
