"""The public surface: a short __all__, and an import that stays light."""

from __future__ import annotations

import subprocess
import sys

import lrwatch


def test_all_names_resolve_and_nothing_else_is_lazily_public() -> None:
    for name in lrwatch.__all__:
        assert getattr(lrwatch, name) is not None
    assert set(lrwatch._LAZY) | {"__version__"} == set(lrwatch.__all__)


def test_watch_is_the_monitor_entry_point() -> None:
    from lrwatch.monitor import Monitor, watch

    assert lrwatch.watch is watch and lrwatch.Monitor is Monitor


def _loaded_after(code: str) -> list[str]:
    probe = (
        f"import sys; {code}; "
        "print(','.join(m for m in ('torch', 'scipy', 'watchdog', 'click', 'matplotlib') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return [m for m in out.stdout.strip().split(",") if m]


def test_import_lrwatch_leaves_daemon_dependencies_unloaded() -> None:
    assert _loaded_after("import lrwatch; lrwatch.watch") == ["torch"]


def test_the_cli_and_the_daemon_side_do_not_import_torch() -> None:
    loaded = _loaded_after("import lrwatch.cli, lrwatch.serve, lrwatch.report, lrwatch.analyze")
    assert "torch" not in loaded


def test_integrations_load_on_first_attribute_access() -> None:
    assert _loaded_after("import lrwatch") == []
    out = subprocess.run(
        [sys.executable, "-c", "import lrwatch; print(lrwatch.hf.__name__)"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == "lrwatch.hf"
