"""The custom-scalars layout, read back by TensorBoard's own plugin code (no HTTP, no browser)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tensorboard import context
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins import base_plugin
from tensorboard.plugins.custom_scalar import custom_scalars_plugin, layout_pb2
from tensorboard.plugins.scalar import scalars_plugin
from tiny_run import train

from lrwatch import schema
from lrwatch.daemon.spans import BAND, BAND_TAG_FMT, LOG10_BAND_TAG_FMT
from lrwatch.daemon.tb_layout import LAYOUT_TAG, layout_charts
from lrwatch.events.reader import find_runs, read_run


@pytest.fixture(scope="module")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("layout")
    for name in ("a", "b"):
        train(root / name, steps=20)
    cmd = [sys.executable, "-m", "lrwatch", "serve", str(root), "--once"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)  # the layout and the band
    return root


def _plugin(logdir: Path) -> custom_scalars_plugin.CustomScalarsPlugin:
    """TensorBoard's custom-scalars plugin over ``logdir``, wired as the server wires it."""
    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    plugins: dict[str, Any] = {}
    ctx = base_plugin.TBContext(
        logdir=str(logdir),
        multiplexer=mux,
        data_provider=data_provider.MultiplexerDataProvider(mux, str(logdir)),
        plugin_name_to_instance=plugins,
    )
    plugins["scalars"] = scalars_plugin.ScalarsPlugin(ctx)
    plugin = plugins["custom_scalars"] = custom_scalars_plugin.CustomScalarsPlugin(ctx)
    return plugin


def _matched(plugin: Any, run: str, regexes: list[str]) -> set[str]:
    out: set[str] = set()
    for regex in regexes:
        out |= set(plugin.scalars_impl(context.RequestContext(), run, regex, "")["tag_to_events"])
    return out


def test_tensorboard_should_serve_the_layout_once_though_every_run_has_one(logdir: Path) -> None:
    layout = json.loads(_plugin(logdir).layout_impl(context.RequestContext(), ""))
    served = [
        (c["title"], [(ch["title"], ch["multiline"]["tag"]) for ch in c["chart"]])
        for c in layout["category"]
    ]
    assert served == layout_charts()  # merged across the two runs, without duplicates


@pytest.mark.parametrize(
    ("chart", "run", "tags"),
    [
        ("train loss (lrwatch/loss)", "a", {schema.LOSS}),
        ("validation loss", "a", {"val/loss"}),
        ("effective LR", "a", {schema.LR}),
        ("grad norm before clipping, clip threshold", "b", {schema.GRAD_NORM}),
        ("update ratio with the 1e-4 / 1e-3 / 1e-2 band", "a", {schema.UPDATE_RATIO}),
        (
            "update ratio with the 1e-4 / 1e-3 / 1e-2 band",
            "a/lrwatch_daemon",
            {BAND_TAG_FMT.format(k) for k in BAND},
        ),
        ("log10 update ratio, band -4 / -3 / -2", "b", {schema.UPDATE_RATIO_LOG10}),
        (
            "log10 update ratio, band -4 / -3 / -2",
            "b/lrwatch_daemon",
            {LOG10_BAND_TAG_FMT.format(k) for k in BAND},
        ),
    ],
)
def test_layout_charts_should_match_the_tags_the_hook_writes(
    logdir: Path, chart: str, run: str, tags: set[str]
) -> None:
    charts = {title: regexes for _, group in layout_charts() for title, regexes in group}
    assert _matched(_plugin(logdir), run, charts[chart]) == tags


def test_layout_should_be_encoded_as_torch_add_custom_scalars_encodes_it(
    logdir: Path, tmp_path: Path
) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path)) as writer:
        writer.add_custom_scalars(
            {cat: {t: ["Multiline", tags] for t, tags in charts} for cat, charts in layout_charts()}
        )

    def layout(run_dir: Path) -> tuple[Any, Any, Any]:
        acc = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
        acc.Reload()
        proto = acc.Tensors(LAYOUT_TAG)[0].tensor_proto
        meta = acc.SummaryMetadata(LAYOUT_TAG).plugin_data.plugin_name
        return layout_pb2.Layout.FromString(proto.string_val[0]), proto.tensor_shape, meta

    assert layout(logdir / "a" / schema.DAEMON_SUBRUN) == layout(tmp_path)


def test_the_layout_should_stay_out_of_lrwatchs_own_reading(logdir: Path) -> None:
    assert [p.name for p in find_runs(logdir)] == ["a", "b"]
    assert not any(s.tag.startswith("lrwatch_daemon/") for s in read_run(logdir / "a"))


def test_band_lines_should_span_the_run_at_the_band_values(logdir: Path) -> None:
    acc = EventAccumulator(str(logdir / "b"), size_guidance={"scalars": 0})
    acc.Reload()
    ratio = acc.Scalars(schema.UPDATE_RATIO_LOG10)
    assert [p.value for p in ratio] == pytest.approx(
        [math.log10(p.value) for p in acc.Scalars(schema.UPDATE_RATIO)], rel=1e-5
    )
    steps = [ratio[0].step, ratio[-1].step]
    acc = EventAccumulator(str(logdir / "b" / schema.DAEMON_SUBRUN), size_guidance={"scalars": 0})
    acc.Reload()
    for name, level in BAND.items():
        for fmt, value in ((BAND_TAG_FMT, level), (LOG10_BAND_TAG_FMT, math.log10(level))):
            points = acc.Scalars(fmt.format(name))
            assert [p.step for p in points] == steps
            assert [p.value for p in points] == [pytest.approx(value)] * 2


@pytest.mark.parametrize("chart", ["train loss (lrwatch/loss)", "validation loss", "effective LR"])
def test_daemon_sub_runs_should_add_no_series_to_the_loss_and_lr_charts(
    logdir: Path, chart: str
) -> None:
    charts = {title: regexes for _, group in layout_charts() for title, regexes in group}
    plugin = _plugin(logdir)
    for run in ("a", "b"):
        assert _matched(plugin, run, charts[chart])
        assert _matched(plugin, f"{run}/{schema.DAEMON_SUBRUN}", charts[chart]) == set()
