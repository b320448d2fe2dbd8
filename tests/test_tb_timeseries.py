"""What TensorBoard's Time Series tab shows first, for a real run watched by a real daemon.

The tags come from TensorBoard itself: its metrics plugin (the handler of
``/data/plugin/timeseries/tags``) over a logdir that ``lrwatch.watch`` and ``lrwatch serve --once``
wrote. The order is the tab's own rule, ported below from tensorboard/webapp/metrics (cards
sorted by ``compareTagNames``, grouped by the part of the tag before the first ``/`` in that
order, and on a first visit only the first two groups expanded); bench/tensorboard_check.py
compares this port with the card order a real browser renders.
"""

from __future__ import annotations

import functools
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard import context
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.plugins import base_plugin
from tensorboard.plugins.metrics import metrics_plugin
from tiny_run import train

from lrwatch import schema
from lrwatch.daemon.outputs import read_audit

HEADLINE = {schema.LOSS, schema.LR, schema.GRAD_NORM, schema.UPDATE_RATIO}
BOOKKEEPING = {schema.CONTROL_ACK, schema.CLIP_MAX_NORM, schema.LR_FACTOR, schema.CLOSED}


_NUMBER = re.compile(r"\d+(?:\.\d*)?(?:[eE][+-]?\d*)?")


def _compare_tags(a: str, b: str) -> int:
    """TensorBoard's ``compareTagNames``: where both tags have a number they compare as numbers;
    otherwise a "break" (``/`` or a digit) sorts before any other character, and two breaks
    compare equal, one character each."""
    i = j = 0
    while True:
        if i == len(a) or j == len(b):
            return (i < len(a)) - (j < len(b))
        if a[i].isdigit() and b[j].isdigit():
            ma, mb = _NUMBER.match(a, i), _NUMBER.match(b, j)
            assert ma is not None and mb is not None
            na, nb = float(ma.group().rstrip("eE+-")), float(mb.group().rstrip("eE+-"))
            if na != nb:
                return -1 if na < nb else 1
            i, j = ma.end(), mb.end()
            continue
        ba, bb = a[i] == "/" or a[i].isdigit(), b[j] == "/" or b[j].isdigit()
        if ba != bb:
            return -1 if ba else 1
        if not ba and a[i] != b[j]:
            return -1 if a[i] < b[j] else 1
        i, j = i + 1, j + 1


def time_series_groups(scalar_tags: set[str]) -> list[tuple[str, list[str]]]:
    """[(group, cards in order)] as the Time Series tab lays the scalar cards out."""
    groups: dict[str, list[str]] = {}
    for tag in sorted(scalar_tags, key=functools.cmp_to_key(_compare_tags)):
        groups.setdefault(tag.split("/", 1)[0], []).append(tag)
    return list(groups.items())


def test_compare_tags_should_order_as_tensorboard_documents_its_comparator() -> None:
    # The examples of compareTagNames' docstring (tensorboard/webapp/metrics/utils.ts).
    assert _compare_tags("a10b", "a2b") == 1 and _compare_tags("a/a", "a+/a") == -1
    assert _compare_tags("a/b", "a") == 1 and _compare_tags("x1.5e3", "x1600") == -1
    key = functools.cmp_to_key(_compare_tags)
    assert sorted(["lrwatch_x/a", "lrwatch.y/a", "lrwatch/z"], key=key) == [
        "lrwatch/z",
        "lrwatch.y/a",
        "lrwatch_x/a",
    ]


@pytest.fixture(scope="module")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run with two Linear layers (4 tensors) that diverges, and the daemon's outputs."""
    root = tmp_path_factory.mktemp("timeseries")
    train(root / "run", steps=40, blow_at=20)
    cmd = [sys.executable, "-m", "lrwatch", "serve", str(root), "--once"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    return root


def _served_scalar_tags(logdir: Path) -> dict[str, list[str]]:
    """run -> scalar tags, as TensorBoard's ``/data/plugin/timeseries/tags`` serves them."""
    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    ctx = base_plugin.TBContext(
        logdir=str(logdir),
        multiplexer=mux,
        data_provider=data_provider.MultiplexerDataProvider(mux, str(logdir)),
    )
    tags = metrics_plugin.MetricsPlugin(ctx)._tags_impl(context.RequestContext(), "")
    run_tag_info: dict[str, list[str]] = tags["scalars"]["runTagInfo"]
    return run_tag_info


def test_time_series_should_open_on_the_headline_charts_then_the_decisions(logdir: Path) -> None:
    served = _served_scalar_tags(logdir)
    assert set(served) == {"run", f"run/{schema.DAEMON_SUBRUN}"}
    groups = time_series_groups({t for tags in served.values() for t in tags})
    (first, first_cards), (second, second_cards) = groups[:2]  # expanded on a first visit
    assert first == schema.PREFIX and set(first_cards) == HEADLINE | {schema.UPDATE_RATIO_LOG10}
    assert first_cards.index(schema.LOSS) < 3  # alphabetical inside a group: grad_norm first
    assert second == schema.DECISION_TAG_FMT.split("/")[0]
    assert second_cards and all(
        c.startswith(schema.DECISION_TAG_FMT.format("")) for c in second_cards
    )


def test_time_series_should_keep_per_layer_and_bookkeeping_cards_out_of_the_first_groups(
    logdir: Path,
) -> None:
    served = _served_scalar_tags(logdir)
    groups = time_series_groups({t for tags in served.values() for t in tags})
    names = [g for g, _ in groups]
    per_layer = [g for g in names if g in schema.PER_TENSOR_PREFIXES.values()]
    assert len(per_layer) == 3 and min(names.index(g) for g in per_layer) >= 2
    assert all(len(cards) == 4 for g, cards in groups if g in per_layer)  # 2 weights, 2 biases
    control = names.index(schema.CONTROL_ACK.split("/")[0])
    assert BOOKKEEPING & set(groups[control][1])
    assert all(g.startswith(schema.PREFIX + ".") for g in names[1:control])  # lrwatch.* first
    assert "val" in names[control:]  # the user's own tags after lrwatch's


def test_the_decision_chart_should_span_the_steps_of_the_loss_chart(logdir: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = EventAccumulator(str(logdir / "run"), size_guidance={"scalars": 0})
    trainer.Reload()
    loss = [e.step for e in trainer.Scalars(schema.LOSS)]
    daemon = logdir / "run" / schema.DAEMON_SUBRUN
    acc = EventAccumulator(str(daemon), size_guidance={"scalars": 0})
    acc.Reload()
    cut = schema.DECISION_TAG_FMT.format("lr_cut")
    marks = [(e.step, e.value) for e in acc.Scalars(cut)]
    assert [s for s, _ in marks] == sorted({s for s, _ in marks})  # left to right, never back
    assert (marks[0][0], marks[-1][0]) == (loss[0], loss[-1])
    # A staircase of the cumulative divisor decided: 1 until the audit log's cut, then its factor.
    [decided] = [r for r in read_audit(logdir / "run") if r.get("action") == "lr_cut"]
    assert marks[0][1] == 1.0 and marks[-1][1] == decided["factor"]
    assert [v for s, v in marks if s < decided["step"]] == [1.0] * len(
        [s for s, _ in marks if s < decided["step"]]
    )


def test_tensorboard_by_default_stops_reading_the_earlier_file_of_a_run(tmp_path: Path) -> None:
    """Why README asks for ``--reload_multifile true`` when two writers share a run directory
    (the Lightning and HF integrations, ``writer=``), and why the daemon keeps a sub-run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "run"
    first = SummaryWriter(str(run), filename_suffix=".a")  # both names: same second, .a < .b
    first.add_scalar("theirs", 1.0, 1)
    first.flush()
    second = SummaryWriter(str(run), filename_suffix=".b")
    second.add_scalar("ours", 1.0, 1)
    second.flush()
    acc = EventAccumulator(str(run))  # what `tensorboard --logdir` uses per run by default
    acc.Reload()
    for step in (2, 3):
        for writer, tag in ((first, "theirs"), (second, "ours")):
            writer.add_scalar(tag, float(step), step)
            writer.flush()
    acc.Reload()  # the next reload of a live TensorBoard
    first.close()
    second.close()
    assert [e.step for e in acc.Scalars("ours")] == [1, 2, 3]
    assert [e.step for e in acc.Scalars("theirs")] == [1]  # frozen until TensorBoard restarts
