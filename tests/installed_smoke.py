"""What a user gets from ``pip install lrwatch-*.whl``: every module, every command, the hook.

Run by ``scripts/test-wheel`` with the Python of a fresh venv that holds the built wheel (not an
editable install) and from a directory where the source tree is not importable, so a subpackage
missing from the wheel, a module that only imports from the source tree, or a console script that
does not resolve fails here. It is a script rather than a pytest module because the suite's
conftest imports the source tree.

The run: train a small model with the hook until its LR is raised 60x (it diverges), then
``analyze``, ``serve --once --apply`` (writes the control file), ``apply`` by hand, ``status``,
``report``, and resume training so the hook applies and acknowledges the daemon's actions.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import torch

import lrwatch

# These need the [integrations] extra (Lightning, transformers), which the wheel check leaves out.
OPTIONAL = {
    "lrwatch.integrations.lightning",
    "lrwatch.integrations.hf",
    "lrwatch.lightning",
    "lrwatch.hf",
}


def check(cond: bool, what: str) -> None:
    if not cond:
        sys.exit(f"FAIL: {what}")
    print(f"ok: {what}")


def cli(*args: str, expect: int = 0) -> str:
    exe = Path(sys.executable).with_name("lrwatch")  # the console script the wheel installed
    proc = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300)
    check(
        proc.returncode == expect,
        f"lrwatch {' '.join(args)} exits {expect}"
        f" (got {proc.returncode}: {proc.stderr.strip()[-400:]})",
    )
    return proc.stdout


class Trainer:
    """SGD on a linear target, resumable: ``fit`` may be called again, as after a restart."""

    def __init__(self) -> None:
        self.gen = torch.Generator().manual_seed(0)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)
        )
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.05)
        self.x = torch.randn(256, 8, generator=self.gen)
        self.y = 2 * self.x[:, :1] + 0.1 * torch.randn(256, 1, generator=self.gen)
        self.mon_state: dict[str, object] | None = None

    def fit(self, run: Path, *, steps: int, blow_at: int | None) -> None:
        """From ``blow_at`` on the LR is 60x too high (the run diverges)."""
        loss_fn = torch.nn.MSELoss()
        with lrwatch.watch(self.model, self.opt, logdir=run, criterion=loss_fn, log_every=1) as mon:
            if self.mon_state is not None:
                mon.load_state_dict(self.mon_state)  # a resume: the control file is this run's
            for step in range(steps):
                if step == blow_at:
                    for group in self.opt.param_groups:
                        group["lr"] = 3.0
                idx = torch.randint(0, 256, (32,), generator=self.gen)
                self.opt.zero_grad()
                loss_fn(self.model(self.x[idx]), self.y[idx]).backward()
                self.opt.step()
                if step % 10 == 9:
                    with torch.no_grad():
                        val = loss_fn(self.model(self.x[:64] + 0.05), self.y[:64]).item()
                    mon.log(**{"val/loss": val})
                if mon.should_stop:
                    break
            self.mon_state = mon.state_dict()


def main() -> None:
    source_tree = Path(os.environ.get("SMOKE_SOURCE_TREE", Path(__file__).resolve().parents[1]))
    where = Path(lrwatch.__file__).resolve()
    check(source_tree not in where.parents, f"lrwatch imported from the install ({where.parent})")
    version = metadata.version("lrwatch")
    check(version == lrwatch.__version__, f"metadata version {version} == lrwatch.__version__")
    names = sorted(m.name for m in pkgutil.walk_packages(lrwatch.__path__, "lrwatch."))
    for name in names:
        if name not in OPTIONAL and name != "lrwatch.__main__":  # that one runs the CLI
            importlib.import_module(name)
    packages = {n for n in names if n.count(".") == 1 and hasattr(sys.modules.get(n), "__path__")}
    check(
        {"lrwatch.hook", "lrwatch.events", "lrwatch.analysis", "lrwatch.analysis.detectors"}
        <= packages | {n for n in names if n.endswith(".detectors")},
        f"all {len(names)} modules import, subpackages present: {sorted(packages)}",
    )
    check(any(Path(p, "py.typed").exists() for p in lrwatch.__path__), "py.typed is installed")
    check(cli("--version").strip().endswith(version), "lrwatch --version")

    with tempfile.TemporaryDirectory() as tmp:
        logdir = Path(tmp, "runs")
        run = logdir / "blowup"
        trainer = Trainer()
        trainer.fit(run, steps=160, blow_at=80)
        analysis = json.loads(cli("analyze", str(run), "--json"))
        check(bool(analysis["decisions"]), f"analyze finds decisions: {analysis['decisions'][:1]}")
        cli("serve", str(logdir), "--once", "--apply")
        control = json.loads((run / "lrwatch_control.json").read_text())
        check(bool(control["actions"]), f"serve --apply wrote {len(control['actions'])} actions")
        cli("apply", str(run), "--lr-cut", "2", "--reason", "wheel smoke test")
        status = json.loads(cli("status", str(logdir), "--json"))
        check(len(status) == 1, "status sees the run")
        picture = Path(tmp, "report.png")
        cli("report", str(run), "-o", str(picture))
        check(picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "report writes a PNG")
        trainer.fit(run, steps=40, blow_at=None)  # the hook applies the control file's actions
        applied = json.loads((run / "lrwatch_applied.json").read_text())["applied_ids"]
        issued = [
            a["id"] for a in json.loads((run / "lrwatch_control.json").read_text())["actions"]
        ]
        check(sorted(applied) == sorted(issued), f"the hook applied actions {issued}")
        cli("serve", str(logdir), "--once", "--apply")
        audit = [json.loads(line) for line in (run / "lrwatch_audit.jsonl").open()]
        acks = sorted(r["action_id"] for r in audit if r.get("event") == "acknowledged")
        check(acks == sorted(issued), f"the daemon read one acknowledgement per action: {acks}")
    print("installed wheel: every check passed")


if __name__ == "__main__":
    main()
