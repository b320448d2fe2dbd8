"""Where decisions go: the audit log, TensorBoard markers (read back by TensorBoard), console."""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lrwatch import schema
from lrwatch.daemon import outputs
from lrwatch.daemon.outputs import DecisionSink, read_audit
from lrwatch.errors import ConfigError
from lrwatch.schema import ActionKind, Decision, Finding, Kind, Severity

PLATEAU = Finding(
    kind=Kind.PLATEAU,
    step=90,
    tag=schema.LOSS,
    severity=Severity.WARNING,
    evidence={"best": 0.51, "num_bad_steps": 40, "nan_seen": math.nan},
    message="no improvement for 40 steps",
)
EXPLOSION = Finding(
    kind=Kind.EXPLOSION,
    step=120,
    tag=schema.GRAD_NORM,
    severity=Severity.CRITICAL,
    evidence={"value": 812.0, "median": 3.1},
    message="grad norm 260x its median",
)
CUT = Decision(
    step=100, action=ActionKind.LR_CUT, reason="plateau: cut by 2", factor=2, findings=(PLATEAU,)
)
CLIP = Decision(
    step=120, action=ActionKind.CLIP, reason="explosion", max_norm=4.5, findings=(EXPLOSION,)
)
STOP = Decision(step=130, action=ActionKind.STOP, reason="cut 1024x")
CLIP_LONG = Decision(
    step=121, action=ActionKind.CLIP, reason="explosion", max_norm=10.399410390853875,
    findings=(EXPLOSION,),
)  # fmt: skip
BACK = Decision(
    step=140, action=ActionKind.ROLLBACK, reason="diverged", to_step=40, findings=(EXPLOSION,)
)
BEST = Decision(step=150, action=ActionKind.STOP, reason="overfit", to_step=80)


def _clock() -> float:
    return 1_700_000_000.5


def _scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _texts(logdir: Path) -> dict[int, str]:
    acc = EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    acc.Reload()
    return {
        e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors(schema.DECISION_TEXT_TAG)
    }


def test_emit_should_append_one_audit_line_per_decision_with_evidence(tmp_path: Path) -> None:
    with DecisionSink(tmp_path, mode="apply", clock=_clock) as sink:
        sink.emit(CUT, action_id=3)
        sink.emit(STOP, action_id=None)
    lines = (tmp_path / outputs.AUDIT_FILENAME).read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])  # strict JSON: a NaN in the evidence is spelled as a string
    assert first == {
        "version": outputs.RECORD_VERSION,
        "event": "decision",
        "decision_id": first["decision_id"],
        "run": str(tmp_path),
        "mode": "apply",
        "applied": True,
        "action_id": 3,
        "held_back": None,
        "hooks": [],
        "wall_time": 1_700_000_000.5,
        "time": "2023-11-14T22:13:20Z",
        "lrwatch_version": first["lrwatch_version"],
        "step": 100,
        "action": "lr_cut",
        "factor": 2,
        "reason": "plateau: cut by 2",
        "findings": [PLATEAU.to_json()],
    }
    assert first["findings"][0]["evidence"]["nan_seen"] == "nan"
    assert read_audit(tmp_path) == [first, json.loads(lines[1])]
    # The id hooks deduplicate on: the step, then a hash; one per decision, stable across emits.
    assert re.fullmatch(r"100-[0-9a-f]{16}", first["decision_id"])
    assert json.loads(lines[1])["decision_id"].startswith("130-")
    assert first["decision_id"] == outputs.decision_id(str(tmp_path), CUT)


def test_acknowledge_should_append_an_acknowledged_line(tmp_path: Path) -> None:
    sink = DecisionSink(tmp_path, mode="apply", clock=_clock)
    sink.emit(CUT, action_id=1)
    sink.acknowledge(1, step=104, lr=0.05)
    sink.close()
    records = read_audit(tmp_path)
    assert [r["event"] for r in records] == ["decision", "acknowledged"]
    assert records[1] | {"time": None} == {
        "version": 1,
        "event": "acknowledged",
        "run": str(tmp_path),
        "action_id": 1,
        "step": 104,
        "lr": 0.05,
        "wall_time": 1_700_000_000.5,
        "time": None,
    }


def test_read_audit_should_skip_a_torn_last_line_and_warn_on_a_bad_middle_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = {"event": "decision", "step": 1}
    path = tmp_path / outputs.AUDIT_FILENAME
    path.write_text(json.dumps(good) + "\nnot json\n" + json.dumps(good) + '\n{"event": "dec')
    with caplog.at_level(logging.WARNING, logger="lrwatch.daemon.outputs"):
        assert read_audit(tmp_path) == [good, good]
    assert [r.getMessage() for r in caplog.records] == [f"{path} line 2 is not JSON; skipped"]
    assert read_audit(tmp_path / "missing") == []


def test_emit_should_write_markers_and_text_that_tensorboard_reads_at_the_steps(
    tmp_path: Path,
) -> None:
    with DecisionSink(tmp_path, mode="recommend") as sink:
        sink.emit(CUT, action_id=None)
        sink.emit(CLIP, action_id=None)
        sink.emit(STOP, action_id=None)
        sink.mark_findings([replace_step(PLATEAU, 140), replace_step(PLATEAU, 140, Severity.INFO)])
    daemon = tmp_path / schema.DAEMON_SUBRUN
    # A finding is a spike from a 0 baseline; a decision moves a staircase that holds its level.
    assert _scalars(daemon) == {
        schema.FINDING_TAG_FMT.format("plateau"): [
            (89, 0.0), (90, 2.0), (91, 0.0), (139, 0.0), (140, 2.0), (141, 0.0)
        ],
        schema.FINDING_TAG_FMT.format("explosion"): [(119, 0.0), (120, 3.0), (121, 0.0)],
        schema.DECISION_TAG_FMT.format("lr_cut"): [(99, 1.0), (100, 2.0)],
        schema.DECISION_TAG_FMT.format("clip"): [(119, 0.0), (120, 4.5)],
        schema.DECISION_TAG_FMT.format("stop"): [(129, 0.0), (130, 1.0)],
    }  # fmt: skip
    texts = _texts(daemon)
    assert sorted(texts) == [100, 120, 130]
    assert "lr_cut /2 recommended: plateau: cut by 2" in texts[100]
    assert "no improvement for 40 steps" in texts[100] and "num_bad_steps=40" in texts[100]


def replace_step(finding: Finding, step: int, severity: Severity | None = None) -> Finding:
    return Finding(
        finding.kind,
        step,
        finding.tag,
        severity or finding.severity,
        finding.evidence,
        finding.message,
    )


def test_a_sink_without_decisions_should_create_no_event_file(tmp_path: Path) -> None:
    DecisionSink(tmp_path, mode="recommend").close()
    assert not (tmp_path / schema.DAEMON_SUBRUN).exists()


@pytest.mark.parametrize(
    ("decision", "action_id", "mode", "level", "text"),
    [
        (CUT, None, "recommend", logging.INFO, "step 100: lr_cut /2 recommended: plateau"),
        (CUT, 7, "apply", logging.WARNING, "lr_cut /2 applied as action #7: plateau"),
        (CUT, None, "apply", logging.INFO, "lr_cut /2 recommended (not applied: budget): plat"),
        (CLIP, None, "recommend", logging.WARNING, "clip max_norm=4.5 recommended: explosion"),
        (STOP, None, "recommend", logging.WARNING, "stop recommended: cut 1024x"),
        (CLIP_LONG, None, "recommend", logging.WARNING, "clip max_norm=10.4 recommended"),
        (BACK, 3, "apply", logging.WARNING, "rollback to step 40 applied as action #3"),
        (BEST, 4, "apply", logging.WARNING, "stop on the weights of step 80 applied as action #4"),
    ],
    ids=["recommendation", "applied", "over-budget", "critical-finding", "stop", "clip-digits",
         "rollback", "stop-on-best"],
)
def test_emit_should_log_one_console_line_at_a_sensible_level(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    decision: Decision,
    action_id: int | None,
    mode: outputs.Mode,
    level: int,
    text: str,
) -> None:
    with caplog.at_level(logging.DEBUG, logger="lrwatch.daemon.outputs"):
        DecisionSink(tmp_path, mode=mode, writer_factory=_NullWriter).emit(
            decision, action_id=action_id, held_back="budget" if mode == "apply" else None
        )
    [record] = caplog.records
    assert record.levelno == level
    assert record.getMessage().startswith(f"{tmp_path} step {decision.step}: ")
    assert text in record.getMessage()


class _NullWriter:
    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir

    def add_scalars(
        self, step: int, tags: list[str], values: list[float], *, wall_time: float | None = None
    ) -> None:
        pass

    def add_text(self, step: int, tag: str, text: str, *, wall_time: float | None = None) -> None:
        pass

    def flush(self, timeout: float = 10.0) -> bool:
        return True

    def close(self) -> None:
        pass


class _BrokenWriter(_NullWriter):
    def add_scalars(
        self, step: int, tags: list[str], values: list[float], *, wall_time: float | None = None
    ) -> None:
        raise OSError("disk full")


def test_a_failing_tensorboard_writer_should_not_stop_the_audit_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="lrwatch.daemon.outputs"):
        DecisionSink(tmp_path, mode="recommend", writer_factory=_BrokenWriter).emit(
            CUT, action_id=None
        )
    assert [r["step"] for r in read_audit(tmp_path)] == [100]
    assert any(
        "cannot write TensorBoard markers: disk full" in r.getMessage() for r in caplog.records
    )


def test_an_audit_line_that_cannot_be_written_should_raise_for_the_daemon_to_retry(
    tmp_path: Path,
) -> None:
    gone = tmp_path / "gone"
    with pytest.raises(OSError):
        DecisionSink(gone, mode="recommend", writer_factory=_NullWriter).emit(CUT, action_id=None)


def test_sink_should_refuse_an_unknown_mode(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mode must be one of"):
        DecisionSink(tmp_path, mode="act")  # type: ignore[arg-type]


def test_decision_text_should_print_evidence_to_four_significant_digits(tmp_path: Path) -> None:
    noisy = Finding(
        kind=Kind.EXPLOSION, step=120, tag=schema.LOSS, severity=Severity.WARNING,
        evidence={"value": 2.164363384246826, "robust_z": 6.419288452966186, "history": 79},
        message="spike",
    )  # fmt: skip
    decision = Decision(step=120, action=ActionKind.LR_CUT, reason="x", factor=5, findings=(noisy,))
    with DecisionSink(tmp_path, mode="recommend") as sink:
        sink.emit(decision, action_id=None)
    text = _texts(tmp_path / schema.DAEMON_SUBRUN)[120]
    assert "value=2.164, robust_z=6.419, history=79" in text
    # the audit log keeps every digit
    assert read_audit(tmp_path)[0]["findings"][0]["evidence"]["value"] == 2.164363384246826


def test_a_restarted_sink_should_never_draw_a_marker_tag_backwards(tmp_path: Path) -> None:
    from lrwatch.events.reader import read_run

    with DecisionSink(tmp_path, mode="recommend") as sink:
        sink.reach(1, 100)
        sink.emit(CUT, action_id=None)  # step 100
        sink.follow(band=True, force=True)
    with DecisionSink(tmp_path, mode="recommend") as sink:  # a new daemon: a new file
        sink.reach(1, 150)  # it re-reads the run from the start
        sink.emit(CUT, action_id=None)  # re-derived: already drawn, must not be drawn again
        sink.emit(replace(CUT, step=120), action_id=None)
        sink.follow(band=True, force=True)
    by_tag: dict[str, list[tuple[int, float]]] = {}
    for point in read_run(tmp_path / schema.DAEMON_SUBRUN):  # both files, in TensorBoard's order
        by_tag.setdefault(point.tag, []).append((point.step, point.value))
    for points in by_tag.values():
        assert [s for s, _ in points] == sorted({s for s, _ in points})
    # The cumulative divisor decided: 2 from step 100 on, 4 from 120 (the restart kept the level).
    assert by_tag[schema.DECISION_TAG_FMT.format("lr_cut")] == [
        (1, 1.0), (99, 1.0), (100, 2.0), (119, 2.0), (120, 4.0), (150, 4.0)
    ]  # fmt: skip
    band = by_tag["lrwatch_daemon/update_ratio_log10_band/low"]
    assert band == [(1, -4.0), (100, -4.0), (150, -4.0)]


def test_acknowledgements_should_count_up_on_the_decisions_chart(tmp_path: Path) -> None:
    from lrwatch.daemon.outputs import ACKNOWLEDGED_TAG

    with DecisionSink(tmp_path, mode="apply") as sink:
        sink.reach(1, 200)
        sink.emit(CUT, action_id=1)  # decided at step 100
        sink.acknowledge(1, step=110, lr=0.05)  # applied by the trainer at step 110
        sink.follow(band=False, force=True)
    scalars = _scalars(tmp_path / schema.DAEMON_SUBRUN)
    assert scalars[ACKNOWLEDGED_TAG] == [(1, 0.0), (109, 0.0), (110, 1.0), (200, 1.0)]
    assert scalars[schema.DECISION_TAG_FMT.format("lr_cut")] == [
        (1, 1.0), (99, 1.0), (100, 2.0), (200, 2.0)
    ]  # fmt: skip
