"""One cached zoo job in a worker process: train, then read back what lrwatch found and did.

A job is (task, multiplier, seed, mode). Its result is cached under a key that hashes the zoo's
own code, the job and the lrwatch source the result depends on: the hook's files for a ``none``
training (its replay is keyed by all of lrwatch, so a detector change replays it again without
retraining), all of lrwatch for ``apply``, nothing of lrwatch for the ``plateau`` baseline.
A held-out split's tasks are keyed by their own digests instead of ``zoo`` and ``hook``, so
adding a split, or a task to one, leaves every other cached run valid.
"""

from __future__ import annotations

import ast
import hashlib
import json
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import holdout
import holdout2

HERE = Path(__file__).resolve().parent
LRWATCH = HERE.parent.parent / "lrwatch"
OUT = HERE.parent / "out" / "zoo"
# the hook side: what a `none` training executes of lrwatch (everything else only reads its files)
HOOK_FILES = (
    "__init__.py",
    "control.py",
    "errors.py",
    "schema.py",
    "events/__init__.py",
    "events/encode.py",
    "events/sink.py",
    "events/writer.py",
)  # fmt: skip  (plus every module of lrwatch/hook/ and lrwatch/objstore/)
# ...and what a held-out Lightning or Hugging Face training executes besides
INTEGRATION_FILES = ("lightning.py", "hf.py", "integrations/lightning.py", "integrations/hf.py")
# the held-out splits: each registry module has TASKS, source_files() and train(); and the lrwatch
# files its `none` trainings execute besides the hook's (holdout2 is plain PyTorch: none)
HELD_OUT: dict[str, ModuleType] = {"holdout": holdout, "holdout2": holdout2}
HELD_OUT_LRWATCH_FILES = {"holdout": INTEGRATION_FILES, "holdout2": ()}
HELD_OUT_SPLIT = {task: split for split, mod in HELD_OUT.items() for task in mod.TASKS}


def _digest(paths: list[Path]) -> str:
    """Hash of the files' syntax trees: reformatting or a comment does not redo a sweep."""
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        h.update(ast.dump(ast.parse(p.read_text())).encode())
    return h.hexdigest()


def source_digests(lrwatch_dir: Path = LRWATCH) -> dict[str, str]:
    """Hashes of the zoo's code, of the hook's files and of all of lrwatch.

    Each held-out split S has its own two (``zoo_S``, ``hook_S``): its modules and the
    lrwatch files its ``none`` trainings execute (for ``holdout``, the framework integrations)
    key only its runs, so adding or editing them leaves every other cached run valid.
    """
    zoo = [HERE / "tasks.py", HERE / "trainer.py"]
    hook = [lrwatch_dir / n for n in HOOK_FILES] + sorted(lrwatch_dir.glob("hook/*.py"))
    hook += sorted(lrwatch_dir.glob("objstore/*.py"))  # the hook uploads through it
    out = {
        "zoo": _digest(zoo),
        "hook": _digest(hook),
        "lrwatch": _digest(list(lrwatch_dir.rglob("*.py"))),
    }
    for split, mod in HELD_OUT.items():
        out[f"zoo_{split}"] = _digest(zoo + mod.source_files())
        extra = [lrwatch_dir / n for n in HELD_OUT_LRWATCH_FILES[split]]
        out[f"hook_{split}"] = _digest(hook + extra)
    return out


def snapshot() -> Path:
    """A copy of lrwatch's source that this sweep's workers and daemons import: editing the
    working tree during a long sweep cannot mix two versions into one result (or its cache)."""
    digest = source_digests()["lrwatch"][:16]
    root = OUT / "snapshot" / digest
    if not (root / "lrwatch").exists():
        tmp = OUT / "snapshot" / f".{digest}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(LRWATCH, tmp / "lrwatch", ignore=shutil.ignore_patterns("__pycache__"))
        tmp.rename(root)
    return root


def job_key(job: dict[str, Any], digests: dict[str, str], part: str) -> str:
    """Cache key of one part (``train`` or ``replay``) of a job."""
    needs = {
        ("train", "none"): ("zoo", "hook"),
        ("train", "apply"): ("zoo", "lrwatch"),
        ("train", "plateau"): ("zoo",),
        ("replay", "none"): ("zoo", "hook", "lrwatch"),
    }[(part, job["mode"])]
    split = HELD_OUT_SPLIT.get(job["task"])
    if split is not None:
        needs = tuple(f"{n}_{split}" if n in ("zoo", "hook") else n for n in needs)
    blob = json.dumps([job, part, [digests[n] for n in needs]], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def replay(run_dir: Path) -> dict[str, Any]:
    """Recommend mode: the run's event files through the analyzer at its defaults."""
    from lrwatch.analysis.analyzer import analyze_run

    a = analyze_run(run_dir)
    return {
        "findings": [
            {
                "kind": f.kind.value,
                "severity": f.severity.value,
                "step": f.step,
                "message": f.message[:160],
            }
            for f in a.findings
        ],
        "decisions": [
            {"step": d.step, "action": d.action.value, "factor": d.factor} for d in a.decisions
        ],
    }


def audit(run_dir: Path) -> dict[str, Any]:
    """Apply mode: the daemon's decisions and the hook's acknowledgements, from the audit log."""
    path = run_dir / "lrwatch_audit.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    return {
        "decisions": [
            {
                "step": x["step"],
                "action": x["action"],
                "factor": x.get("factor"),
                "applied": x.get("applied"),
            }
            for x in lines
            if x.get("event") == "decision"
        ],
        "acks": [
            {"id": x["action_id"], "step": x["step"]}
            for x in lines
            if x.get("event") == "acknowledged"
        ],
    }


def run_job(job: dict[str, Any], digests: dict[str, str]) -> dict[str, Any]:
    """Train (unless cached) and replay (unless cached); returns the job's merged result."""
    train_key = job_key(job, digests, "train")
    cache = OUT / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    done = cache / f"{train_key}.json"
    home = OUT / "runs" / train_key
    if done.exists():
        result = json.loads(done.read_text())
    else:
        from trainer import train as train_plain

        split = HELD_OUT_SPLIT.get(job["task"])
        train = HELD_OUT[split].train if split is not None else train_plain
        shutil.rmtree(home, ignore_errors=True)
        result = train(job["task"], job["mult"], job["seed"], job["mode"], home / "run")
        if job["mode"] == "apply":
            result["apply"] = audit(home / "run")
            shutil.rmtree(home, ignore_errors=True)
        if job["mode"] == "plateau":
            shutil.rmtree(home, ignore_errors=True)
        done.write_text(json.dumps(result))
    if job["mode"] == "none":
        rkey = job_key(job, digests, "replay")
        rdone = cache / f"{rkey}.replay.json"
        if rdone.exists():
            result["replay"] = json.loads(rdone.read_text())
        else:
            result["replay"] = replay(home / "run")
            rdone.write_text(json.dumps(result["replay"]))
    return result
