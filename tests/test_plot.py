"""``lrwatch report``: the plotted data against TensorBoard's reader, and the files written."""

from __future__ import annotations

import base64
import math
import re
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_run import VAL_EVERY, train

from lrwatch import schema
from lrwatch.analysis.analyzer import analyze_run
from lrwatch.cli import main
from lrwatch.daemon.outputs import DecisionSink, read_audit
from lrwatch.errors import ConfigError
from lrwatch.schema import Decision
from lrwatch.views.plot import ReportData, _panels, key_lines, pyplot, report_data, thin
from lrwatch.views.report_page import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def blow(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("plot") / "blow"
    train(run, steps=60, blow_at=40)
    return run


def _tb_series(run: Path, tag: str) -> tuple[list[int], list[float]]:
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    events = acc.Scalars(tag)
    return [e.step for e in events], [e.value for e in events]


def _same(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(
        x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b, strict=True)
    )


def test_report_data_should_plot_the_values_tensorboard_reads(blow: Path) -> None:
    data = report_data(blow)
    expected = {
        "loss": schema.LOSS,
        "val_loss": "val/loss",
        "lr": schema.LR,
        "grad_norm": schema.GRAD_NORM,
        "update_ratio": schema.UPDATE_RATIO,
    }
    assert data.tags == expected
    for name, tag in expected.items():
        steps, values = _tb_series(blow, tag)
        assert data.series[name][0] == steps, name
        assert _same(data.series[name][1], values), name
    assert len(data.series["val_loss"][0]) == 60 // VAL_EVERY


def test_report_markers_should_be_the_analyzers_findings_and_decisions(blow: Path) -> None:
    analysis = analyze_run(blow)
    data = report_data(blow)
    decisions = [m for m in data.markers if m.kind == "decision"]
    findings = [m for m in data.markers if m.kind == "finding"]
    assert data.source == "analysis"
    assert len(decisions) == len(analysis.decisions) >= 1
    assert len(findings) == len(analysis.findings) >= 1
    assert sorted(m.step for m in decisions) == sorted(d.step for d in analysis.decisions)
    assert [m.label for m in decisions] == [f"D{i}" for i in range(1, len(decisions) + 1)]
    assert all(m.reason and len(m.reason) <= 90 for m in data.markers)


def _audited_copy(blow: Path, tmp_path: Path) -> tuple[Path, Decision]:
    """A copy of the run whose first decision the daemon's audit log records as action #7."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(blow, run)
    first = analyze_run(run).decisions[0]
    with DecisionSink(run, mode="apply") as sink:
        sink.emit(first, action_id=7)
    return run, first


def test_report_should_take_decisions_from_the_daemons_audit_log(
    blow: Path, tmp_path: Path
) -> None:
    run, first = _audited_copy(blow, tmp_path)
    data = report_data(run)
    decisions = [m for m in data.markers if m.kind == "decision"]
    assert data.source == "audit"
    assert len(decisions) == len(read_audit(run)) == 1
    assert (decisions[0].step, decisions[0].applied) == (first.step, True)


def _png_size(raw: bytes) -> tuple[int, int]:
    assert raw[:8] == PNG_MAGIC and raw[12:16] == b"IHDR"
    return struct.unpack(">II", raw[16:24])


def test_report_cli_should_write_a_png(blow: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.png"
    result = CliRunner().invoke(main, ["report", str(blow), "-o", str(out)])
    assert result.exit_code == 0, result.output
    width, height = _png_size(out.read_bytes())
    assert width > 1000 and height > 800


def test_report_html_should_embed_the_png_and_list_every_marker(blow: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    data = write_report(blow, out)
    text = out.read_text()
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    image = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert image is not None
    _png_size(base64.b64decode(image.group(1)))
    assert text.count("<tr class=") == len(data.markers)


def test_report_cli_should_refuse_an_unknown_suffix(blow: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["report", str(blow), "-o", str(tmp_path / "r.txt")])
    assert result.exit_code == 2 and ".html" in result.output


def test_report_without_matplotlib_should_say_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what a missing package looks like
    with pytest.raises(ConfigError, match=r"lrwatch\[report\]"):
        pyplot()


@pytest.mark.parametrize("n", [10, 4000, 10_007])
def test_thin_should_keep_the_extremes_and_bound_the_points(n: int) -> None:
    steps = list(range(n))
    values = [math.sin(i / 7.0) + (50.0 if i == n // 3 else 0.0) for i in steps]
    kept_steps, kept = thin(steps, values, limit=1000)
    assert len(kept) <= (n if n <= 1000 else 1000)
    assert max(kept) == max(values) and min(kept) == min(values)
    assert kept_steps == sorted(kept_steps)


def test_report_should_mark_the_step_the_trainer_applied_a_decision(
    blow: Path, tmp_path: Path
) -> None:
    from torch.utils.tensorboard import SummaryWriter

    run, first = _audited_copy(blow, tmp_path)
    with SummaryWriter(str(run), filename_suffix=".ack") as w:  # the hook's ack, 3 steps later
        w.add_scalar(schema.CONTROL_ACK, 7.0, first.step + 3)
    data = report_data(run)
    [decision] = [m for m in data.markers if m.kind == "decision"]
    assert (decision.step, decision.applied_step) == (first.step, first.step + 3)
    assert f"[applied at step {first.step + 3}]" in "\n".join(key_lines(data.markers))


def _drawn_axes(data: ReportData) -> list[Any]:
    plt = pyplot()
    fig, axes = plt.subplots(4, 1)
    _panels(list(axes), data)
    return [fig, *axes]


def test_grad_norm_panel_should_go_log_when_a_preclip_spike_spans_decades() -> None:
    steps = list(range(100))
    clipped = [0.5 + 0.01 * (i % 7) for i in steps]
    preclip = [v if i != 60 else 3e6 for i, v in zip(steps, clipped, strict=True)]
    data = ReportData(
        run="r",
        series={"grad_norm": (steps, clipped), "grad_norm_preclip": (steps, preclip)},
        tags={"grad_norm": schema.GRAD_NORM, "grad_norm_preclip": schema.GRAD_NORM_PRECLIP},
        markers=[],
        source="analysis",
    )
    fig, _loss, _lr, grad, _ratio = _drawn_axes(data)
    try:
        assert grad.get_yscale() == "log"
        # the healthy clipped norms stay readable: the axis stops at 1e4 x their median
        assert grad.get_ylim()[1] <= 1e4 * 0.6
    finally:
        pyplot().close(fig)


def test_clip_threshold_of_zero_is_no_line_at_zero() -> None:
    steps = [0, 10, 20]
    data = ReportData(
        run="r",
        series={"clip_max_norm": (steps, [0.0, 1.5, 0.0])},
        tags={"clip_max_norm": schema.CLIP_MAX_NORM},
        markers=[],
        source="analysis",
    )
    fig, _loss, _lr, grad, _ratio = _drawn_axes(data)
    try:
        [line] = [ln for ln in grad.get_lines() if "clip threshold" in str(ln.get_label())]
        ys = [y for y in line.get_ydata() if not math.isnan(y)]
        assert ys == [1.5]  # "no clip" (0) is a gap, never a threshold drawn at 0
    finally:
        pyplot().close(fig)
