"""The public surface: a short __all__, and an import that stays light."""

from __future__ import annotations

import subprocess
import sys
import types

import lrwatch


def test_all_lists_exactly_the_public_names() -> None:
    # Submodules appear as attributes once imported; they are not part of the flat API.
    public = {
        n
        for n, v in vars(lrwatch).items()
        if not n.startswith("_") and not isinstance(v, types.ModuleType) and n != "annotations"
    }
    assert set(lrwatch.__all__) == public | {"__version__"}


def test_import_lrwatch_leaves_daemon_dependencies_unloaded() -> None:
    code = (
        "import sys, lrwatch; "
        "heavy = [m for m in ('scipy', 'watchdog', 'click') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
