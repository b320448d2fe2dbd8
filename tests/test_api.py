"""The public surface: a short __all__, and an import that stays light."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import lrwatch


def test_all_names_resolve_and_nothing_else_is_lazily_public() -> None:
    for name in lrwatch.__all__:
        assert getattr(lrwatch, name) is not None
    assert set(lrwatch._LAZY) | {"__version__"} == set(lrwatch.__all__)


def test_watch_is_the_monitor_entry_point() -> None:
    from lrwatch.hook.monitor import Monitor, watch

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
    loaded = _loaded_after(
        "import lrwatch.cli, lrwatch.daemon.serve, lrwatch.daemon.outputs,"
        " lrwatch.analysis.analyzer"
    )
    assert "torch" not in loaded


def test_a_local_run_and_the_daemon_never_load_fsspec_or_a_storage_client(tmp_path: Any) -> None:
    """Object storage is optional: only a URL logdir loads fsspec (lrwatch.objstore.store)."""
    code = (
        "import sys, torch, lrwatch, lrwatch.cli, lrwatch.daemon.serve, lrwatch.views.status; "
        "m = torch.nn.Linear(2, 1); o = torch.optim.SGD(m.parameters(), lr=0.1); "
        f"mon = lrwatch.watch(m, o, logdir={str(tmp_path)!r}); "
        "m(torch.randn(3, 2)).sum().backward(); o.step(); mon.close(); "
        "print([n for n in sys.modules if n.split('.')[0] in "
        "('fsspec', 's3fs', 'gcsfs', 'botocore', 'aiobotocore', 'boto3')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_integrations_load_on_first_attribute_access() -> None:
    assert _loaded_after("import lrwatch") == []
    out = subprocess.run(
        [sys.executable, "-c", "import lrwatch; print(lrwatch.hf.__name__)"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == "lrwatch.hf"


def test_public_names_are_pinned() -> None:
    """The names users import: changing one is a breaking change, so it must be deliberate."""
    assert sorted(lrwatch.__all__) == [
        "LRFinderResult", "Monitor", "StopTraining", "__version__", "find_lr", "watch",
    ]  # fmt: skip
    from lrwatch.hf import LRWatchCallback
    from lrwatch.lightning import LRWatch

    assert LRWatch.__module__ == "lrwatch.integrations.lightning"
    assert LRWatchCallback.__module__ == "lrwatch.integrations.hf"


def test_the_cli_commands_are_pinned() -> None:
    from lrwatch.cli import main

    assert sorted(main.commands) == ["analyze", "apply", "report", "serve", "status"]


def test_readme_development_tree_names_every_module() -> None:
    """The file list is the architecture: README's tree must show every module that exists."""
    from pathlib import Path

    root = Path(lrwatch.__file__).parent
    readme = (root.parent / "README.md").read_text()
    tree = readme[readme.index("## Development") :]
    tree = tree[: tree.index("```", tree.index("```") + 3)]
    missing = [
        str(p.relative_to(root))
        for p in sorted(root.rglob("*.py"))
        if p.name not in ("__init__.py", "__main__.py", "_window.py")
        and p.parent.name != "detectors"
        and p.stem not in tree
    ]
    assert not missing, f"modules missing from README's Development tree: {missing}"
