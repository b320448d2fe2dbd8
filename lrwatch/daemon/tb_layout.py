"""A TensorBoard custom-scalars layout that puts lrwatch's related charts side by side.

TensorBoard's Scalars tab groups charts by tag prefix only, so the loss, the LR that drives it
and the clip threshold that bounds the gradient norm end up far apart. The custom_scalars plugin
reads a ``Layout`` proto from a summary tagged ``custom_scalars__config__`` (what
``SummaryWriter.add_custom_scalars`` writes: the serialised proto as a scalar DT_STRING tensor)
and shows the charts it lists in its own tab. :func:`write_layout` writes that summary into the
daemon's sub-run ``<run>/lrwatch_daemon/``: the trainer's files stay untouched and the reader
never sees it.

TensorBoard merges identical layouts from several runs, so writing one per run is harmless.
"""

from __future__ import annotations

import os
import re
import socket
import time
from pathlib import Path

from lrwatch import schema
from lrwatch.analysis import roles
from lrwatch.daemon.spans import BAND_TAG_FMT, LOG10_BAND_TAG_FMT
from lrwatch.events.encode import file_version_record, frame

LAYOUT_TAG = "custom_scalars__config__"  # tensorboard.plugins.custom_scalar.metadata
PLUGIN_NAME = "custom_scalars"
FILE_SUFFIX = ".lrwatch_layout"
# The band lines are written by outputs.DecisionSink, which carries them along the run's steps.


def _exact(*tags: str) -> str:
    """A regex matching exactly ``tags`` (the plugin matches chart tags as regexes)."""
    return "^(" + "|".join(re.escape(t) for t in tags) + ")$"


def _prefix(fmt: str) -> str:
    """A regex matching every tag of a ``{}`` format (the part before the braces)."""
    return "^" + re.escape(fmt.format(""))


def layout_charts() -> list[tuple[str, list[tuple[str, list[str]]]]]:
    """The layout as plain data: [(category title, [(chart title, [tag regexes])])].

    What the layout proto can and cannot say (tensorboard/plugins/custom_scalar/layout.proto):
    a chart is a title plus tag regexes (multiline) or value/lower/upper triples (margin); a
    category has a title and ``closed``. No axis scale, colour or step range. So: colours are
    per run, and train and validation loss get charts of their own instead of one colour; the
    update ratio has a log10 chart with the band at -4/-3/-2 (the linear chart's toggle is the
    card's own button); decision charts span the run because their lines do (spans.Spans), and
    a step range is all two charts can share. Daemon sub-runs hold no loss, LR or ratio tags, so
    they add no series to those charts however many runs there are.
    """
    val_loss = _exact(*roles.ALIASES["metric"])
    lr_groups = "^" + re.escape(schema.LR_GROUP_FMT.format("")) + r"\d+$"
    decisions = _prefix(schema.DECISION_TAG_FMT)
    return [
        (
            "lrwatch: loss, learning rate, decisions (same steps)",
            [
                ("train loss (lrwatch/loss)", [_exact(schema.LOSS)]),
                ("validation loss", [val_loss]),
                ("effective LR", [_exact(schema.LR), lr_groups]),
                ("decisions (lr_cut: divisor so far, clip: max_norm, stop: 1), acks", [decisions]),
            ],
        ),
        (
            "lrwatch: update/weight ratio (healthy ~1e-3) and gradients",
            [
                (
                    "log10 update ratio, band -4 / -3 / -2",
                    [_exact(schema.UPDATE_RATIO_LOG10), _prefix(LOG10_BAND_TAG_FMT)],
                ),
                (
                    "grad norm before clipping, clip threshold",
                    [_exact(schema.GRAD_NORM, schema.GRAD_NORM_PRECLIP, schema.CLIP_MAX_NORM)],
                ),
                (
                    "update ratio with the 1e-4 / 1e-3 / 1e-2 band",
                    [_exact(schema.UPDATE_RATIO), _prefix(BAND_TAG_FMT)],
                ),
            ],
        ),
        (
            "lrwatch: findings, acknowledgements, diagnostics",
            [
                ("findings (1 info, 2 warning, 3 critical)", [_prefix(schema.FINDING_TAG_FMT)]),
                (
                    "applied: control ids, cumulative LR divisor, stop",
                    [_exact(schema.CONTROL_ACK, schema.LR_FACTOR, schema.STOP)],
                ),
                ("non-finite steps / skipped steps", [_exact(schema.NONFINITE, schema.SKIPPED)]),
                ("weight norm", [_exact(schema.WEIGHT_NORM)]),
            ],
        ),
    ]


def layout_proto() -> object:
    """The layout as TensorBoard's ``layout_pb2.Layout``."""
    from tensorboard.plugins.custom_scalar import layout_pb2

    layout = layout_pb2.Layout()
    for title, charts in layout_charts():
        category = layout.category.add(title=title)
        for chart_title, tags in charts:
            category.chart.add(title=chart_title, multiline={"tag": tags})
    return layout


def layout_record(wall_time: float) -> bytes:
    """One framed event holding the layout summary, encoded as ``add_custom_scalars`` does."""
    from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2

    tensor = tensor_pb2.TensorProto(
        dtype="DT_STRING",
        string_val=[layout_proto().SerializeToString()],  # type: ignore[attr-defined]
    )  # no tensor_shape dims: a scalar string, as tf.make_tensor_proto(bytes) gives
    metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=PLUGIN_NAME)
    )
    value = summary_pb2.Summary.Value(tag=LAYOUT_TAG, metadata=metadata, tensor=tensor)
    event = event_pb2.Event(wall_time=wall_time, step=0, summary=summary_pb2.Summary(value=[value]))
    return frame(event.SerializeToString())


def write_layout(run_dir: Path) -> Path:
    """Write the layout: one new, complete event file in ``<run_dir>/lrwatch_daemon/``.

    Returns its path. Call it once per run. Raises OSError when the directory cannot be written
    (the caller decides how loud to be).
    """
    subrun = Path(run_dir) / schema.DAEMON_SUBRUN
    subrun.mkdir(parents=True, exist_ok=True)
    now = time.time()
    name = f"events.out.tfevents.{int(now):010d}.{socket.gethostname()}.{os.getpid()}{FILE_SUFFIX}"
    path = subrun / name
    data = file_version_record(now) + layout_record(now)
    # Written whole under a temporary name, then renamed: TensorBoard never reads half a layout.
    tmp = subrun / f".lrwatch_layout.{os.getpid()}.tmp"  # no "tfevents": TensorBoard skips it
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path
