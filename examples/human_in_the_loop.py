"""Human in the loop: lrwatch recommends, you look at the report, you decide with ``lrwatch apply``.

A walkthrough that runs every step for real and prints what it does, so you can repeat it by hand
on your own job. The job is ``examples/mistuned.py`` (an MLP on scikit-learn's digits whose peak
LR of 0.6 is about ten times too high), run in two legs from a checkpoint::

    python examples/mistuned.py --logdir runs/human --steps 150 --ckpt-every 150    # 1. train
    lrwatch serve --once runs/human          # 2. recommend only: audit log + TensorBoard markers
    lrwatch report runs/human -o runs/human/report.png                              # 3. look
    lrwatch status runs/human
    lrwatch apply runs/human --lr-cut 10 --reason "loss bounces in a band"        # 4. decide
    python examples/mistuned.py --logdir runs/human --steps 250 --resume          # 5. go on
    tensorboard --logdir runs/human                                               # 6. see it

Nothing touches the job until step 4: ``serve`` without ``--apply`` only recommends. The hook in
the resumed job reads the control file at its next check, cuts the LR and writes an ack into the
event files. Here the logdir holds a single run, so LOGDIR and RUN are the same directory.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lrwatch import schema
from lrwatch.daemon.outputs import read_audit
from lrwatch.events.reader import read_run

HERE = Path(__file__).resolve().parent
MISTUNED = HERE / "mistuned.py"
FALLBACK_FACTOR = 2  # the gentlest cut, when lrwatch recommended no lr_cut


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--logdir", type=Path, help="default: runs/human-<time>")
    p.add_argument("--steps", type=int, help="total optimizer steps (default 1000; quick 250)")
    p.add_argument("--first-leg", type=int, help="steps before the human looks (default 150)")
    p.add_argument("--lr", type=float, default=0.6, help="the job's peak LR (too high)")
    p.add_argument("--warmup", type=int, default=20, help="the job's warm-up steps")
    p.add_argument("--no-baseline", action="store_true", help="skip the run without the cut")
    p.add_argument("--quick", action="store_true", help="small step counts (tests, smoke runs)")
    args = p.parse_args()
    args.logdir = args.logdir or Path("runs") / time.strftime("human-%Y%m%d-%H%M%S")
    args.steps = args.steps or (250 if args.quick else 1000)
    args.first_leg = args.first_leg or 150
    if not args.warmup < args.first_leg < args.steps:
        p.error("need --warmup < --first-leg < --steps (the cut lands after the warm-up)")
    return args


def banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def run(argv: list[str], *, shown: str) -> str:
    """Run one real command, echo it as a person would type it, and indent its output."""
    print(f"$ {shown}", flush=True)
    paths = [str(HERE.parent), os.environ.get("PYTHONPATH", "")]  # lrwatch importable, uninstalled
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    for line in proc.stdout.splitlines():
        print(f"    {line}")
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {shown}\n{proc.stderr[-3000:]}")
    return proc.stdout


def lrwatch(*args: str) -> str:
    """The ``lrwatch`` CLI, through this interpreter so the example works without installing."""
    return run([sys.executable, "-m", "lrwatch", *args], shown=shlex.join(["lrwatch", *args]))


def mistuned(*args: str) -> str:
    shown = shlex.join(["python", f"examples/{MISTUNED.name}", *args])
    return run([sys.executable, str(MISTUNED), *args], shown=shown)


def pick_factor(audit: list[dict[str, Any]]) -> tuple[int, str]:
    """The human's choice: the factor of lrwatch's latest lr_cut recommendation, else a fallback."""
    cuts = [r for r in audit if r.get("event") == "decision" and r.get("action") == "lr_cut"]
    if cuts:
        rec = cuts[-1]
        return int(rec["factor"]), f"lrwatch recommended /{rec['factor']} at step {rec['step']}"
    return FALLBACK_FACTOR, f"no lr_cut was recommended; the gentlest cut, /{FALLBACK_FACTOR}"


def show_recommendations(audit: list[dict[str, Any]]) -> None:
    decisions = [r for r in audit if r.get("event") == "decision"]
    if not decisions:
        print("lrwatch sees nothing to act on yet (no decision in the audit log)")
    for r in decisions:
        what = r["action"] + (f" /{r['factor']}" if "factor" in r else "")
        status = f"mode {r['mode']}, applied {r['applied']}"
        print(f"recommended at step {r['step']}: {what}  ({status})")
        print(f"  why: {r['reason']}")


def effective_lr_around_ack(run_dir: Path) -> dict[str, Any]:
    """The hook's ack, read back from the event files, and the effective LR around it."""
    scalars = read_run(run_dir)
    acks = [s for s in scalars if s.tag == schema.CONTROL_ACK]
    if not acks:
        return {}
    ack = acks[0]
    lrs = [s for s in scalars if s.tag == schema.LR]
    before = [s for s in lrs if s.step < ack.step]
    after = [s for s in lrs if s.step >= ack.step]
    return {
        "action_id": int(ack.value),
        "step": ack.step,
        "lr_before": before[-1].value if before else None,
        "lr_after": after[0].value if after else None,
    }


def main() -> None:
    args = parse_args()
    run_dir: Path = args.logdir  # one run per logdir here: LOGDIR and RUN are the same directory
    if run_dir.exists() and any(run_dir.iterdir()):
        sys.exit(f"{run_dir} is not empty: give a fresh --logdir")
    job = ["--lr", str(args.lr), "--warmup", str(args.warmup)]
    print(__doc__.splitlines()[0])
    print(f"logdir (and run): {run_dir}")
    saved = train_first_leg(run_dir, steps=args.first_leg, job=job, keep=not args.no_baseline)
    audit = recommend(run_dir)
    look(run_dir)
    factor = decide(run_dir, audit)
    with_cut = resume(run_dir, steps=args.steps, job=job, factor=factor)
    if saved is not None:
        compare(saved, total=str(args.steps), job=job, with_cut=with_cut)
    banner("6. See it all in TensorBoard (the daemon's markers are the lrwatch_daemon sub-run)")
    print(f"tensorboard --logdir {run_dir}")


def train_first_leg(run_dir: Path, *, steps: int, job: list[str], keep: bool) -> Path | None:
    """Step 1; with ``keep``, a copy of the checkpoint for the comparison run without the cut."""
    banner(f"1. Train the mis-tuned job for {steps} steps, saving a checkpoint")
    mistuned("--logdir", str(run_dir), "--steps", str(steps), "--ckpt-every", str(steps), *job)
    if not keep:
        return None
    saved = run_dir / "baseline_no_cut" / "checkpoint.pt"
    saved.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(run_dir / "checkpoint.pt", saved)
    return saved


def recommend(run_dir: Path) -> list[dict[str, Any]]:
    """Step 2: the daemon in recommend mode, once; returns the audit log it wrote."""
    banner("2. Ask lrwatch for advice without touching the job (serve without --apply)")
    lrwatch("serve", "--once", str(run_dir))
    audit = read_audit(run_dir)
    print(f"audit log {run_dir / 'lrwatch_audit.jsonl'}:")
    show_recommendations(audit)
    print(f"(`lrwatch analyze {run_dir}` replays the same analysis as a table, writing nothing)")
    return audit


def look(run_dir: Path) -> None:
    """Step 3: the pictures a person reads before deciding."""
    banner("3. Look at the report and the status")
    lrwatch("report", str(run_dir), "-o", str(run_dir / "report.png"))
    lrwatch("report", str(run_dir), "-o", str(run_dir / "report.html"))
    print(f"open {run_dir / 'report.png'} (or report.html in a browser): loss, LR, grad norm and")
    print("update ratio, with the finding and the recommended decision marked")
    lrwatch("status", str(run_dir))


def decide(run_dir: Path, audit: list[dict[str, Any]]) -> int:
    """Step 4: the human's action, through the same control file the daemon would write."""
    banner("4. The human decides: lrwatch apply")
    factor, why = pick_factor(audit)
    print(f"chosen: cut the LR by {factor} ({why})")
    reason = f"human, after reading the report: {why}"
    lrwatch("apply", str(run_dir), "--lr-cut", str(factor), "--reason", reason)
    return factor


def resume(run_dir: Path, *, steps: int, job: list[str], factor: int) -> dict[str, Any]:
    """Step 5: the job continues; its hook applies the cut and acks it. Returns final losses."""
    banner("5. Resume from the checkpoint; the hook applies the cut at its next check")
    result = run_dir / "result.json"
    mistuned("--logdir", str(run_dir), "--steps", str(steps), "--resume",
             "--result", str(result), *job)  # fmt: skip
    print("(mistuned.py prints its scheduler's own LR; lrwatch's cut applies on top of it)")
    report_ack(run_dir, factor)
    lrwatch("status", str(run_dir))
    return dict(json.loads(result.read_text()))


def report_ack(run_dir: Path, factor: int) -> None:
    ack = effective_lr_around_ack(run_dir)
    if not ack:
        print("no ack in the event files: the hook did not apply the action (see the job's log)")
        return
    print(f"ack of action #{ack['action_id']} in {schema.CONTROL_ACK} at step {ack['step']}")
    before, after = ack["lr_before"], ack["lr_after"]
    if before is not None and after is not None:
        print(f"effective LR ({schema.LR}): {before:.4g} before -> {after:.4g} after "
              f"(ratio {before / after:.3g}, asked for {factor})")  # fmt: skip


def compare(saved: Path, *, total: str, job: list[str], with_cut: dict[str, Any]) -> None:
    """The same resume without lrwatch (so without the cut), from the same checkpoint."""
    out = saved.parent / "result.json"
    mistuned("--logdir", str(saved.parent), "--checkpoint", str(saved), "--no-lrwatch",
             "--steps", total, "--resume", "--result", str(out), *job)  # fmt: skip
    without = json.loads(out.read_text())
    print(f"final validation loss at step {total}: {with_cut['val_loss']:.4g} with the cut, "
          f"{without['val_loss']:.4g} without")  # fmt: skip


if __name__ == "__main__":
    main()
