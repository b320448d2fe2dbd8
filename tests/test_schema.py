"""The contract's JSON forms and tag helpers."""

from __future__ import annotations

import json
import math

import pytest

from lrwatch import schema
from lrwatch.schema import ActionKind, Decision, Finding, Kind, Severity


def test_finding_json_spells_nonfinite_numbers_as_strings() -> None:
    f = Finding(Kind.NONFINITE, 7, schema.LOSS, Severity.CRITICAL, {"value": math.nan, "n": 1})
    doc = json.loads(json.dumps(f.to_json(), allow_nan=False))
    assert doc == {
        "kind": "nonfinite",
        "step": 7,
        "tag": "lrwatch/loss",
        "severity": "critical",
        "evidence": {"value": "nan", "n": 1},
        "message": "",
    }


def test_decision_json_has_factor_or_max_norm_only_when_set() -> None:
    cut = Decision(10, ActionKind.LR_CUT, "plateau", factor=2).to_json()
    clip = Decision(10, ActionKind.CLIP, "spike", max_norm=1.5).to_json()
    assert cut["factor"] == 2 and "max_norm" not in cut
    assert clip["max_norm"] == 1.5 and "factor" not in clip


def test_enum_values_are_the_json_words() -> None:
    assert [k.value for k in Kind] == [
        "nonfinite",
        "explosion",
        "plateau",
        "oscillation",
        "ratio_high",
        "ratio_low",
        "overfit",
        "divergence",
        "slow_progress",
    ]
    assert {a.value for a in ActionKind} >= {"lr_cut", "clip", "stop", "raise_lr_advice"}


@pytest.mark.parametrize(
    ("quantity", "name", "tag"),
    [
        ("grad_norm", "layers.0.weight", "lrwatch.grad_norm/layers.0.weight"),
        ("update_ratio", "fc.bias", "lrwatch.update_ratio/fc.bias"),
        ("weight_norm", "w", "lrwatch.weight_norm/w"),
    ],
)
def test_per_tensor_tags_get_a_tensorboard_section_per_quantity(
    quantity: str, name: str, tag: str
) -> None:
    assert schema.per_tensor_tag(quantity, name) == tag
    assert tag.split("/")[0] != schema.PREFIX


def test_per_tensor_tag_rejects_unknown_quantity() -> None:
    with pytest.raises(ValueError, match="grad_norm"):
        schema.per_tensor_tag("histogram", "w")


def test_lr_group_tags() -> None:
    assert schema.lr_group_tag(0) == schema.LR
    assert schema.lr_group_tag(3) == "lrwatch/lr/group3"
