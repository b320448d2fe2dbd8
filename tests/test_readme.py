"""README tables are checked against the code, so the docs cannot drift from it."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from lrwatch import schema
from lrwatch.analysis.config import TABLES, settings_of

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def defaults_row(table: str) -> str:
    """The README row of ``table``: ``| `[table]` | `key=default`, ... |``."""
    params = inspect.signature(TABLES[table]).parameters
    cells = ", ".join(f"`{k}={params[k].default!r}`" for k in settings_of(table))
    return f"| `[{table}]` | `{TABLES[table].__name__}` | {cells} |"


@pytest.mark.parametrize("table", sorted(TABLES))
def test_readme_lists_every_setting_with_its_default(table: str) -> None:
    assert defaults_row(table) in README, f"regenerate: {defaults_row(table)}"


def test_readme_tag_table_names_every_tag_the_hook_writes() -> None:
    hook_tags = [
        schema.LOSS, schema.NONFINITE, schema.LR, schema.GRAD_NORM, schema.GRAD_NORM_PRECLIP,
        schema.UPDATE_RATIO, schema.WEIGHT_NORM, schema.LOSS_SCALE, schema.SKIPPED,
        schema.CLIP_MAX_NORM, schema.LR_FACTOR, schema.CONTROL_ACK, schema.STOP, schema.CLOSED,
        schema.lr_group_tag(1).replace("1", "<i>"),
        *(schema.per_tensor_tag(q, "<param>") for q in schema.PER_TENSOR_PREFIXES),
    ]  # fmt: skip
    missing = [t for t in hook_tags if f"`{t}`" not in README]
    assert not missing


def test_readme_lists_every_kind_action_and_allowed_factor() -> None:
    words = set(re.findall(r"`([a-z_]+)`", README))
    assert {k.value for k in schema.Kind} <= words
    assert {a.value for a in schema.ActionKind} <= words
    for factor in schema.ALLOWED_LR_FACTORS:
        assert f"{factor}" in README


def test_readme_decision_json_table_names_every_field_and_hooked_lines_too() -> None:
    """What hooks receive and what the audit log holds is a contract: every key is documented."""
    from lrwatch.daemon.outputs import decision_record, hooked_record
    from lrwatch.schema import ActionKind, Decision

    record = decision_record(
        Decision(5, ActionKind.STOP, "why"), run="r", mode="apply", action_id=1, wall_time=0.0
    )
    table = README[README.index("The decision JSON (") : README.index("### Hooks")]
    decision_keys = set(record) - set(Decision(5, ActionKind.STOP, "why").to_json())
    missing = [k for k in decision_keys if f"`{k}`" not in table]
    assert not missing, f"decision JSON fields missing from README's table: {missing}"
    hooked = hooked_record(
        record, hook="h", attempt=1, returncode=0, timed_out=False, wall_time=0.0
    )
    audit = README[README.index("1. **The audit log**") : README.index("2. **TensorBoard**")]
    assert [k for k in hooked if f'"{k}"' not in audit] == ["version", "run"]  # "..."
