"""Fuzz the control-file reader: every document is accepted or refused with ControlFileError.

Run from the repository root::

    python bench/fuzz_control.py                 # 10**6 documents, ~1-2 min on one core
    python bench/fuzz_control.py -n 20000        # a quick look

Each document starts as a valid control file (1-5 actions of every kind, as ``lrwatch apply``
and the daemon write them) and then gets 1-3 structured mutations, seeded and reproducible:

* a value replaced by a hostile one (400-digit integers, 1e400, NaN, -0, bools, nulls, lists,
  deep nesting, lone surrogates, empty and huge strings), at the top level or in an action;
* a key deleted, an action duplicated, dropped or its id reused, ``actions`` made a dict;
* the bytes themselves: truncated, a byte flipped, a BOM prepended, re-encoded as UTF-16 or
  Latin-1, padded past the size cap, wrapped in deep nesting.

Every document goes through :func:`lrwatch.control.decode_control` (the whole reader after the
file is opened); one in a hundred also goes through :func:`read_control` on a real file. The
counts printed must show 0 under "other exceptions"; each one is listed with its mutation and
first bytes so it can be replayed.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lrwatch.control import MAX_CONTROL_BYTES, decode_control, read_control
from lrwatch.errors import ControlFileError
from lrwatch.schema import CONTROL_FILENAME

KEYS = (
    "id", "action", "factor", "max_norm", "target", "to_step", "reason", "source", "issued_at"
)  # fmt: skip
TOP_KEYS = ("version", "run", "actions")


def deep(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


HOSTILE: list[Callable[[random.Random], Any]] = [
    lambda r: 10 ** r.randint(300, 4000),
    lambda r: -(10 ** r.randint(300, 4000)),
    lambda r: r.choice([1e308, -1e308, 5e-324, -0.0, 0.0, 2.0**53 + 1]),
    lambda r: r.choice([True, False, None]),
    lambda r: r.randint(-(2**64), 2**64),
    lambda r: r.choice([1, 2, 5, 10, 3, 0, -1, 2**24, 2**24 + 1]),
    lambda r: r.uniform(-1e6, 1e6),
    lambda r: r.choice(
        ["", "lr_cut", "clip", "stop", "undo", "rollback", "raise_lr_advice", "\ud800x"]
    ),
    lambda r: "x" * r.choice([1, 1000, 100_000]),
    lambda r: [r.randint(0, 9) for _ in range(r.randint(0, 3))],
    lambda r: {"a": r.random(), "id": r.randint(0, 3)},
    lambda r: deep(r.choice([10, 500, 900])),  # deeper: see mutate_bytes (json.dumps recurses)
]


def valid_document(r: random.Random) -> dict[str, Any]:
    actions: list[dict[str, Any]] = []
    for i in range(1, r.randint(1, 5) + 1):
        kind = r.choice(["lr_cut", "clip", "stop", "undo", "rollback"])
        action: dict[str, Any] = {"id": i, "action": kind, "reason": "r", "source": "daemon"}
        action["issued_at"] = 1.7e9 + i
        if kind == "lr_cut":
            action["factor"] = r.choice([2, 5, 10])
        elif kind == "clip":
            action["max_norm"] = r.choice([0.5, 1.0, 7])
        elif kind == "rollback":
            action["to_step"] = r.choice([0, 1, 100, 2**40])
        elif kind == "undo":
            earlier = [a["id"] for a in actions if a["action"] in ("lr_cut", "clip")]
            if not earlier:
                action = {**action, "action": "stop"}
            else:
                action["target"] = r.choice(earlier)
        actions.append(action)
    return {"version": 1, "run": "fuzz", "actions": actions}


def dict_actions(doc: dict[str, Any]) -> list[dict[str, Any]]:
    actions = doc.get("actions")
    return [a for a in actions if isinstance(a, dict)] if isinstance(actions, list) else []


def mutate_value(r: random.Random, doc: dict[str, Any]) -> str:
    actions = dict_actions(doc)
    value = r.choice(HOSTILE)(r)
    if actions and r.random() < 0.75:
        key = r.choice(KEYS)
        r.choice(actions)[key] = value
        return f"value:{key}"
    key = r.choice(TOP_KEYS)
    doc[key] = value
    return f"value:{key}"


def mutate_structure(r: random.Random, doc: dict[str, Any]) -> str:
    actions = dict_actions(doc)
    if not actions:
        doc.pop(r.choice(TOP_KEYS), None)
        return "structure:drop-top-key"
    choice = r.randrange(5)
    if choice == 0:
        r.choice(actions).pop(r.choice(KEYS), None)
        return "structure:drop-key"
    if choice == 1:
        doc["actions"] = [*actions, dict(r.choice(actions))]
        return "structure:duplicate-action"
    if choice == 2:
        doc["actions"] = [a for a in actions if a is not r.choice(actions)]
        return "structure:drop-action"
    if choice == 3:
        r.choice(actions)["id"] = r.choice(actions).get("id")
        return "structure:reuse-id"
    doc["actions"] = {str(i): a for i, a in enumerate(actions)}
    return "structure:actions-as-dict"


def mutate_bytes(r: random.Random, raw: bytes) -> tuple[bytes, str]:
    choice = r.randrange(7)
    if choice == 0 and raw:
        return raw[: r.randrange(len(raw))], "bytes:truncate"
    if choice == 1 and raw:
        i = r.randrange(len(raw))
        return raw[:i] + bytes([raw[i] ^ (1 << r.randrange(8))]) + raw[i + 1 :], "bytes:flip"
    if choice == 2:
        return b"\xef\xbb\xbf" + raw, "bytes:bom"
    if choice == 3:
        return raw.decode("utf-8", "surrogatepass").encode("utf-16", "surrogatepass"), "bytes:utf16"
    if choice == 4:
        return raw.replace(b'"r"', '"\u00e9"'.encode("latin-1")), "bytes:latin1"
    if choice == 5:
        return raw[:-1] + b', "pad": "' + b"x" * MAX_CONTROL_BYTES + b'"}', "bytes:oversize"
    depth = r.choice([900, 1000, 100_000])
    return b'{"version": 1, "actions": ' + b"[" * depth + b"]" * depth + b"}", "bytes:nesting"


def document(r: random.Random) -> tuple[bytes, str]:
    doc = valid_document(r)
    done = []
    for _ in range(r.randint(1, 3)):
        mutate = mutate_value if r.random() < 0.7 else mutate_structure
        done.append(mutate(r, doc))
    raw = json.dumps(doc, ensure_ascii=r.random() < 0.5).encode("utf-8", "surrogatepass")
    if r.random() < 0.2:
        raw, how = mutate_bytes(r, raw)
        done.append(how)
    return raw, "+".join(sorted(done))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=10**6, help="documents")
    parser.add_argument("--seed", type=int, default=9)
    args = parser.parse_args()
    r = random.Random(args.seed)
    outcome: collections.Counter[str] = collections.Counter()
    other: list[str] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / CONTROL_FILENAME
        for i in range(args.n):
            raw, how = document(r)
            readers: list[Callable[[], object]] = [functools.partial(decode_control, raw)]
            if i % 100 == 0:
                path.write_bytes(raw)
                readers.append(functools.partial(read_control, path))
            for read in readers:
                try:
                    read()
                    outcome["accepted"] += 1
                except ControlFileError:
                    outcome["refused (ControlFileError)"] += 1
                except Exception as err:  # noqa: BLE001 - counting what escapes is the point
                    outcome["other exceptions"] += 1
                    other.append(f"#{i} {how}: {err!r:.120} {raw[:80]!r}")
    seconds = time.perf_counter() - start
    print(f"documents: {args.n} (seed {args.seed}), reads: {sum(outcome.values())}")
    for name in ("accepted", "refused (ControlFileError)", "other exceptions"):
        print(f"  {name:28s} {outcome[name]}")
    print(f"  {seconds:.1f} s, {seconds / max(sum(outcome.values()), 1) * 1e6:.1f} us per read")
    for line in other[:20]:
        print("  escaped:", line)
    raise SystemExit(1 if other else 0)


if __name__ == "__main__":
    main()
