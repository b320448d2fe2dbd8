"""The ``lrwatch`` command: thin click subcommands that parse options and call one function each.

Heavy imports stay inside the subcommands so ``lrwatch --help`` is instant. Exit codes, the same
for every command: 0 done; 1 lrwatch could not do it (one line saying why, e.g. an unreadable
run); 2 the command line is wrong (a bad option, or a path that is not what the command needs:
a missing directory, a log directory of runs where one run is needed, a directory with no run).
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any

import click

from lrwatch import __version__, schema
from lrwatch.errors import LrwatchError

logger = logging.getLogger(__name__)


EPILOG = (
    "Exit codes: 0 done; 1 lrwatch could not do it (one line says why); 2 bad usage, including "
    "a path that is not a run where a run is needed."
)


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "LRWATCH"},
    epilog=EPILOG,
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


class PathError(click.ClickException):
    """A path that is not what the command needs: one line, exit code 2 (usage), no usage dump."""

    exit_code = 2


def _run_dir(ctx: click.Context, param: click.Parameter, value: pathlib.Path) -> pathlib.Path:
    """A run directory: it exists and holds event files itself. A log directory of runs is
    refused with their names, so ``lrwatch apply runs/`` never writes a control file that
    nothing will read and ``report runs/`` never draws an empty picture."""
    from lrwatch.events.reader import find_runs

    if not value.exists():
        raise PathError(f"{value} does not exist")
    if not value.is_dir():
        raise PathError(f"{value} is not a directory")
    runs = find_runs(value)
    if value in runs:
        return value
    if runs:
        names = ", ".join(str(r.relative_to(value)) for r in runs[:5])
        more = f" and {len(runs) - 5} more" if len(runs) > 5 else ""
        raise PathError(
            f"{value} is a log directory holding {len(runs)} run(s), not a run: "
            f"give one of {names}{more}"
        )
    raise PathError(
        f"{value} holds no event files: it is not a run (yet). Point at the directory given to "
        "lrwatch.watch(logdir=...)"
    )


def _log_dir(ctx: click.Context, param: click.Parameter, value: pathlib.Path) -> pathlib.Path:
    """A directory that exists (it may hold no run yet: the daemon waits for them)."""
    if not value.is_dir():
        problem = "is not a directory" if value.exists() else "does not exist"
        raise PathError(f"{value} {problem}")
    return value


def _log_dirs(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> tuple[pathlib.Path | str, ...]:
    """Local log directories (checked as :func:`_log_dir`), or URLs (``s3://...``), not both."""
    from lrwatch.objstore.location import is_url

    urls = [v for v in values if is_url(v)]
    if urls and len(urls) != len(values):
        raise click.BadParameter("give either URLs (s3://...) or local directories, not both")
    return tuple(urls) or tuple(_log_dir(ctx, param, pathlib.Path(v)) for v in values)


def _downloaded(ctx: click.Context, param: click.Parameter, value: str) -> pathlib.Path:
    """A URL's runs brought down into the local view copy; a local path as it is."""
    from lrwatch.objstore.location import default_state_dir, is_url
    from lrwatch.objstore.mirror import local_view

    if not is_url(value):
        return pathlib.Path(value)
    try:
        return local_view(value, default_state_dir())
    except LrwatchError as err:
        fail(err)
    raise AssertionError("unreachable")  # fail() raised


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
@click.argument(
    "run_dir",
    callback=lambda ctx, param, value: _run_dir(ctx, param, _downloaded(ctx, param, value)),
)
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
    """Replay RUN_DIR's history through the detectors and the policy; print what they say.

    RUN_DIR may be a URL (s3://bucket/runs/exp1): the run is downloaded first (new bytes only)
    into $LRWATCH_STATE_DIR/view (default ~/.local/state/lrwatch/view).
    """
    from lrwatch.analysis.analyzer import analyze_run
    from lrwatch.analysis.config import load_config, merge
    from lrwatch.errors import ConfigError
    from lrwatch.views.analysis_table import format_table

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
@click.argument("run_dir", type=click.Path(path_type=pathlib.Path), callback=_run_dir)
@click.option("--lr-cut", type=int, callback=_lr_cut, help="Divide the LR by N (2, 5 or 10).")
@click.option("--clip", type=float, callback=_max_norm, help="Clip gradients at this max norm.")
@click.option("--stop", is_flag=True, help="Make the run stop (mon.should_stop becomes true).")
@click.option(
    "--undo", type=click.IntRange(min=1), help="Undo the earlier cut or clip with this id."
)
@click.option(
    "--rollback",
    type=click.IntRange(min=0),
    metavar="STEP",
    help="Restore the hook's newest in-memory copy of the weights at or before STEP.",
)
@click.option(
    "--best",
    is_flag=True,
    help="With --stop: end on the weights the hook kept at the run's lowest validation loss.",
)
@click.option("--reason", default="", help="Why, for the audit trail.")
def apply(
    run_dir: pathlib.Path,
    lr_cut: int | None,
    clip: float | None,
    stop: bool,
    undo: int | None,
    rollback: int | None,
    best: bool,
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
        ActionKind.ROLLBACK: rollback is not None,
    }
    kinds = [kind for kind, given in chosen.items() if given]
    if len(kinds) != 1:
        raise click.UsageError("give exactly one of --lr-cut, --clip, --stop, --undo, --rollback")
    if best and not stop:
        raise click.UsageError("--best goes with --stop")
    try:
        to_step = _kept_best_step(run_dir) if best else rollback
        action = append_action(
            run_dir, action=kinds[0], factor=lr_cut, max_norm=clip, target=undo,
            to_step=to_step, reason=reason, source="human",
        )  # fmt: skip
    except ConfigError as err:
        raise click.UsageError(str(err)) from err
    except LrwatchError as err:
        fail(err)
    except OSError as err:  # a full disk or a read-only run: one line, the file left as it was
        raise click.ClickException(f"{run_dir}: control file not written: {err}") from err
    click.echo(json.dumps(action.to_json()))


def _kept_best_step(run_dir: pathlib.Path) -> int:
    """The newest step the hook marked as holding a best-weights copy (``--stop --best``)."""
    from lrwatch.events.reader import read_run

    marked = [s.step for s in read_run(run_dir) if s.tag == schema.KEPT_BEST]
    if not marked:
        raise click.UsageError(
            f"{run_dir} marks no best-weights copy ({schema.KEPT_BEST}): the hook keeps one "
            "when a validation loss is passed to mon.log, in one process, with rollback copies on"
        )
    return max(marked)


# ---------------------------------------------------------------------------------- serve (H8)
@main.command()
@click.argument("logdirs", nargs=-1, required=True, callback=_log_dirs)
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
    help="Poll every SECONDS instead of watching files (network filesystems); runs quiet for a "
    "while are looked at less often, at least every 8 x SECONDS.",
)
@click.option("--once", is_flag=True, help="Process what is there now, then exit.")
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=pathlib.Path),
    help="URLs only: where the mirror of the bucket, the daemon's state and the audit logs are "
    "kept  [default: $LRWATCH_STATE_DIR, else $XDG_STATE_HOME/lrwatch, else "
    "~/.local/state/lrwatch]",
)
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
    help="Executable run with each decision as JSON on stdin (repeatable); at least once "
    "per decision, also after a restart; $LRWATCH_DECISION_ID is the key to deduplicate on.",
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
    help="Apply mode rail: never cut the effective LR below this (the policy's own "
    "[policy] min_lr, 0 by default, bounds its advice first; the higher floor wins).",
)
@click.option(
    "--cooldown",
    default=100,
    show_default=True,
    type=click.IntRange(min=0),
    help="Apply mode rail: steps between automatic decisions (the policy's own "
    "[policy] cooldown_steps, 200 by default, applies first; the longer wait wins). A stop "
    "is exempt; an answer to a divergence or to non-finite values waits only 10 steps.",
)
@click.option(
    "--budget",
    default=3,
    show_default=True,
    type=click.IntRange(min=0),
    help="Apply mode: automatic decisions per window; past it, only recommend. The stop or "
    "rollback of a lost run (non-finite, or diverged) is exempt.",
)
@click.option(
    "--window",
    default=1000,
    show_default=True,
    type=click.IntRange(min=1),
    help="Apply mode: the budget's window, in steps.",
)
@click.option(
    "--summary-every",
    default=600.0,
    show_default=True,
    type=click.FloatRange(min=0.0),
    metavar="SECONDS",
    help="A one-line summary (runs, points read, findings, decisions) this often; 0: never.",
)
@click.option(
    "--quiet",
    is_flag=True,
    help="No banner, no summary, no run-discovery lines: decisions, acknowledgements, warnings.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="JSON lines on stdout: start, each finding at warning or above, decision, "
    "acknowledgement, summary (human log lines stay on stderr).",
)
def serve(
    logdirs: tuple[pathlib.Path | str, ...],
    apply_: bool,
    poll: float | None,
    once: bool,
    state_dir: pathlib.Path | None,
    config_file: pathlib.Path | None,
    metric: str | None,
    hooks: tuple[pathlib.Path, ...],
    hook_timeout: float,
    min_lr: float,
    cooldown: int,
    budget: int,
    window: int,
    summary_every: float,
    quiet: bool,
    as_json: bool,
) -> None:
    """Watch the runs under LOGDIRS (and runs that appear later), and advise or act on them.

    LOGDIRS may be URLs (s3://bucket/runs, gs://...; pip install 'lrwatch[s3]'): the daemon then
    polls a local mirror of them (--poll, 1 s by default) and writes control files back.
    """
    import functools

    from lrwatch.analysis.analyzer import RunAnalyzer
    from lrwatch.analysis.config import load_config
    from lrwatch.daemon.bucket import push_everything, sync_once
    from lrwatch.daemon.notify import HookRunner, validate_hooks
    from lrwatch.daemon.rails import Rails
    from lrwatch.daemon.runs import Daemon
    from lrwatch.daemon.serve import serve_forever
    from lrwatch.daemon.tally import Tally
    from lrwatch.errors import ConfigError

    # Decisions and the runs being watched are what the daemon is for: show them without -v.
    shown = ["lrwatch.daemon.outputs"]
    shown += [] if quiet else ["lrwatch.daemon.runs", "lrwatch.daemon.serve"]
    shown += [] if quiet or as_json else ["lrwatch.daemon.tally"]
    for name in shown:
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

    mirrors = _mirrors(logdirs, state_dir)
    local = [m.local for m in mirrors] or [pathlib.Path(d) for d in logdirs]
    banner = _banner(local, apply_=apply_, poll=poll, rails=rails, hooks=len(hooks))
    if mirrors:
        banner += f"\nmirroring {', '.join(m.url for m in mirrors)} (polling, no file events)"
    if as_json:
        mode = "apply" if apply_ else "recommend"
        doc = {"event": "start", "mode": mode, "logdirs": [str(d) for d in logdirs]}
        click.echo(json.dumps({**doc, "version": __version__, "banner": banner}))
    elif not once and not quiet:
        click.echo(banner)
    every = 0.0 if quiet else summary_every
    tally = Tally(every=every, emit=functools.partial(click.echo) if as_json else None)
    daemon = Daemon(
        local,
        mode="apply" if apply_ else "recommend",
        analyzer_factory=functools.partial(RunAnalyzer, config),
        rails=rails,
        hooks=runner,
        tally=tally,
    )
    try:
        if once:
            taken = sync_once(daemon, mirrors, full=True) if mirrors else daemon.process()
            if not as_json:
                click.echo(f"{len(daemon.runs)} runs, {sum(map(len, taken.values()))} decisions")
        else:
            serve_forever(daemon, poll=poll, mirrors=mirrors)
    except LrwatchError as err:
        fail(err)
    finally:
        if not quiet:  # what this session did, once more, on the way out
            tally.maybe_summarize(runs=len(daemon.runs), force=True)
        daemon.close()
        push_everything(mirrors)
        runner.close()


def _mirrors(logdirs: tuple[pathlib.Path | str, ...], state_dir: pathlib.Path | None) -> list[Any]:
    """A :class:`~lrwatch.objstore.mirror.Mirror` per URL in ``logdirs`` (none for local ones)."""
    from lrwatch.objstore.location import default_state_dir
    from lrwatch.objstore.mirror import Mirror

    urls = [d for d in logdirs if isinstance(d, str)]
    try:
        return [Mirror(url, state_dir or default_state_dir()) for url in urls]
    except LrwatchError as err:
        fail(err)
    return []


def _banner(
    logdirs: list[pathlib.Path], *, apply_: bool, poll: float | None, rails: Any, hooks: int
) -> str:
    """What a person leaving ``serve`` open in a terminal needs to know it is doing its job."""
    from lrwatch.events.reader import find_runs

    found = ", ".join(f"{d} ({len(find_runs(d))} runs)" for d in logdirs)
    how = f"polling every {poll:g} s" if poll else "file events (inotify)"
    if apply_:
        mode = (
            f"APPLY mode: decisions are written to each run's control file; rails: LR floor "
            f"{rails.min_lr:g}, cooldown {rails.cooldown} steps, {rails.budget} actions per "
            f"{rails.window} steps"
        )
    else:
        mode = "recommend mode: decisions are recorded, nothing is changed (--apply to act)"
    return (
        f"lrwatch serve {__version__}: {mode}\n"
        f"watching {found} with {how}; {hooks} hook executable(s); new runs are picked up; "
        "Ctrl-C to stop"
    )


# ------------------------------------------------------------------------- status, report (H12)
@main.command()
@click.argument(
    "logdir",
    callback=lambda ctx, param, value: _log_dir(ctx, param, _downloaded(ctx, param, value)),
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per run.")
@click.option(
    "--stale-after",
    default=300.0,
    show_default=True,
    type=click.FloatRange(min=0.0),
    metavar="SECONDS",
    help="A run with no new event for this long, and not closed cleanly ('ended'), is 'stale'.",
)
def status(logdir: pathlib.Path, as_json: bool, stale_after: float) -> None:
    """One line per run under LOGDIR: health, LR, cut, last finding and decision, last step.

    LOGDIR may be a URL (s3://bucket/runs): its runs are downloaded first (new bytes only) into
    $LRWATCH_STATE_DIR/view (default ~/.local/state/lrwatch/view).
    """
    from lrwatch.views.status import collect_status, format_status

    try:
        statuses = collect_status(logdir, stale_after=stale_after)
    except LrwatchError as err:
        fail(err)
    if as_json:
        click.echo(json.dumps([s.to_json() for s in statuses], indent=2))
    else:
        click.echo(format_status(statuses, logdir=logdir))


@main.command()
@click.argument(
    "run_dir",
    callback=lambda ctx, param, value: _run_dir(ctx, param, _downloaded(ctx, param, value)),
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=pathlib.Path),
    default=pathlib.Path("report.png"),
    show_default=True,
    help="Picture (.png, .svg, .pdf) or self-contained page (.html).",
)
def report(run_dir: pathlib.Path, output: pathlib.Path) -> None:
    """Draw RUN_DIR: loss, LR, grad norm, update ratio, with every finding and decision marked.

    RUN_DIR may be a URL (s3://bucket/runs/exp1), downloaded first as for analyze.
    """
    from lrwatch.errors import ConfigError
    from lrwatch.views.report_page import PICTURE_SUFFIXES

    if output.suffix.lower() not in (*PICTURE_SUFFIXES, ".html", ".htm"):
        raise click.BadParameter("use a .png, .svg, .pdf or .html file name", param_hint="-o")
    try:
        from lrwatch.views.report_page import write_report

        data = write_report(run_dir, output)
    except ConfigError as err:  # matplotlib missing: say how to install it
        raise click.UsageError(str(err)) from err
    except LrwatchError as err:
        fail(err)
    n_d = sum(m.kind == "decision" for m in data.markers)
    click.echo(f"{output}: {len(data.markers) - n_d} findings, {n_d} decisions")
