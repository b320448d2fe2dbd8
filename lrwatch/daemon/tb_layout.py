"""A TensorBoard custom-scalars layout that puts lrwatch's related charts side by side.

TensorBoard's Scalars tab groups charts by tag prefix only, so the loss, the LR that drives it
and the clip threshold that bounds the gradient norm end up far apart. The custom_scalars plugin
reads a ``Layout`` proto from a summary tagged ``custom_scalars__config__`` (what
``SummaryWriter.add_custom_scalars`` writes: the serialised proto as a scalar DT_STRING tensor)
and shows the charts it lists in its own tab. :func:`write_layout` writes that summary, plus an
optional reference band for the update/weight ratio, into the daemon's sub-run
``<run>/lrwatch_daemon/``: the trainer's files stay untouched and the reader never sees it.

TensorBoard merges identical layouts from several runs, so writing one per run is harmless.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Sequence
from pathlib import Path

from lrwatch import schema
from lrwatch.analysis import roles
from lrwatch.events.encode import file_version_record, frame

LAYOUT_TAG = "custom_scalars__config__"  # tensorboard.plugins.custom_scalar.metadata
PLUGIN_NAME = "custom_scalars"
FILE_SUFFIX = ".lrwatch_layout"
# Reference lines of the update/weight ratio: ~1e-3 is the usual healthy order of magnitude;
# an order of magnitude either side is the band lrwatch's ratio detector tolerates by default.
BAND = {"low": 1e-4, "target": 1e-3, "high": 1e-2}
BAND_TAG_FMT = "lrwatch_daemon/update_ratio_band/{}"


def _exact(*tags: str) -> str:
    """A regex matching exactly ``tags`` (the plugin matches chart tags as regexes)."""
    return "^(" + "|".join(re.escape(t) for t in tags) + ")$"


def layout_charts() -> list[tuple[str, list[tuple[str, list[str]]]]]:
    """The layout as plain data: [(category title, [(chart title, [tag regexes])])]."""
    val_loss = _exact(*roles.ALIASES["metric"])
    lr_groups = "^" + re.escape(schema.LR_GROUP_FMT.format("")) + r"\d+$"
    return [
        (
            "lrwatch: loss and learning rate",
            [
                ("loss (train, validation)", [_exact(schema.LOSS), val_loss]),
                ("effective LR", [_exact(schema.LR), lr_groups]),
                ("cumulative LR cut (divisor)", [_exact(schema.LR_FACTOR)]),
            ],
        ),
        (
            "lrwatch: gradients",
            [
                (
                    "grad norm, before clipping, clip threshold",
                    [_exact(schema.GRAD_NORM, schema.GRAD_NORM_PRECLIP, schema.CLIP_MAX_NORM)],
                ),
                ("non-finite steps / skipped steps", [_exact(schema.NONFINITE, schema.SKIPPED)]),
            ],
        ),
        (
            "lrwatch: update/weight ratio (healthy ~1e-3)",
            [
                (
                    "update ratio with the 1e-4 / 1e-3 / 1e-2 band",
                    [_exact(schema.UPDATE_RATIO), "^" + BAND_TAG_FMT.format("")],
                ),
                ("weight norm", [_exact(schema.WEIGHT_NORM)]),
            ],
        ),
        (
            "lrwatch: daemon findings and decisions",
            [
                ("findings (1 info, 2 warning, 3 critical)", ["^lrwatch_daemon/finding/"]),
                ("decisions (factor, max_norm or 1)", ["^lrwatch_daemon/decision/"]),
                ("acknowledged control ids / stop", [_exact(schema.CONTROL_ACK, schema.STOP)]),
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


def band_records(steps: Sequence[int], wall_time: float) -> bytes:
    """Constant reference lines at ``steps`` (TensorBoard draws straight lines between them)."""
    from tensorboard.compat.proto import event_pb2, summary_pb2

    values = [
        summary_pb2.Summary.Value(tag=BAND_TAG_FMT.format(name), simple_value=level)
        for name, level in BAND.items()
    ]
    out = []
    for step in sorted(set(steps)):
        event = event_pb2.Event(
            wall_time=wall_time, step=int(step), summary=summary_pb2.Summary(value=values)
        )
        out.append(frame(event.SerializeToString()))
    return b"".join(out)


def write_layout(run_dir: Path, *, band_steps: Sequence[int] = ()) -> Path:
    """Write the layout (and the ratio band at ``band_steps``, e.g. first and last step).

    Writes one new, complete event file in ``<run_dir>/lrwatch_daemon/`` and returns its path.
    Call it once per run; ``band_steps`` can be given again later to extend the band lines.
    Raises OSError when the directory cannot be written (the caller decides how loud to be).
    """
    subrun = Path(run_dir) / schema.DAEMON_SUBRUN
    subrun.mkdir(parents=True, exist_ok=True)
    now = time.time()
    name = f"events.out.tfevents.{int(now):010d}.{socket.gethostname()}.{os.getpid()}{FILE_SUFFIX}"
    path = subrun / name
    data = file_version_record(now) + layout_record(now)
    if band_steps:
        data += band_records(band_steps, now)
    # Written whole under a temporary name, then renamed: TensorBoard never reads half a layout.
    tmp = subrun / f".lrwatch_layout.{os.getpid()}.tmp"  # no "tfevents": TensorBoard skips it
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path
