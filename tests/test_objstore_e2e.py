"""The whole loop through a bucket, with real processes: a trainer writing ``s3://...``, a real
``lrwatch serve --apply s3://...``, and moto's S3 server between them (tests/conftest.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from waiting import wait_for

pytest.importorskip("s3fs", reason="needs the [s3] extra")

from lrwatch import schema  # noqa: E402
from lrwatch.daemon.outputs import read_audit  # noqa: E402
from lrwatch.objstore.location import local_copy  # noqa: E402

TRAINER = Path(__file__).with_name("objstore_trainer.py")


def download(s3: Any, prefix: str, into: Path) -> dict[str, bytes]:
    """The objects under ``prefix``, read with boto3; event segments also saved into ``into``."""
    bucket = s3.url.removeprefix("s3://")
    client = s3.client()
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    found = {
        o["Key"]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listed
    }
    into.mkdir(parents=True, exist_ok=True)
    for key, data in found.items():
        if "tfevents" in key and f"/{schema.DAEMON_SUBRUN}/" not in key:
            (into / key.rsplit("/", 1)[1]).write_bytes(data)
    return found


@pytest.mark.slow
def test_a_decision_should_reach_a_trainer_through_the_bucket(s3: Any, tmp_path: Path) -> None:
    import os

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    url = f"{s3.url}/runs"
    mirror_run = local_copy(Path(os.environ["LRWATCH_STATE_DIR"]) / "serve", url) / "hot"
    daemon = subprocess.Popen(
        [sys.executable, "-m", "lrwatch", "serve", "--apply", "--poll", "0.3", url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        trainer = subprocess.run(
            [sys.executable, str(TRAINER), f"{url}/hot", "30", "3000", "0.01"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert trainer.returncode == 0, trainer.stderr
        done = json.loads(trainer.stdout.splitlines()[-1])
        assert done["applied_at"] is not None, trainer.stderr  # the decision reached the loop
        wait_for(
            lambda: any(r["event"] == "acknowledged" for r in read_audit(mirror_run)),
            timeout=60.0,
            every=0.05,
        )
        daemon.send_signal(signal.SIGTERM)
        _, err = daemon.communicate(timeout=60)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.communicate()
    assert daemon.returncode == 0, err
    assert "Traceback" not in err
    found = download(s3, "runs/hot/", tmp_path / "copy")
    # the bucket holds what the daemon decided and what the trainer did with it
    control = json.loads(found[f"runs/hot/{schema.CONTROL_FILENAME}"])
    audit = [json.loads(line) for line in found[f"runs/hot/{schema.AUDIT_FILENAME}"].splitlines()]
    decided = [r for r in audit if r["event"] == "decision" and r["applied"]]
    assert [a["id"] for a in control["actions"]] == [r["action_id"] for r in decided]
    acks = {r["action_id"]: r["step"] for r in audit if r["event"] == "acknowledged"}
    assert acks[1] == done["applied_at"] > decided[0]["step"]
    applied = json.loads(found[f"runs/hot/{schema.APPLIED_FILENAME}"])
    assert applied["applied_ids"] == sorted(acks)
    # TensorBoard's own reader on the downloaded segments: the losses the trainer logged
    acc = EventAccumulator(str(tmp_path / "copy"), size_guidance={"scalars": 0})
    acc.Reload()
    loss = {e.step: e.value for e in acc.Scalars(schema.LOSS)}
    logged = {int(step): value for step, value in done["losses"].items()}
    assert loss == pytest.approx(logged, rel=1e-6)
    lr = {e.step: e.value for e in acc.Scalars(schema.LR)}
    assert lr[done["steps"]] == pytest.approx(done["lr"], rel=1e-6) and done["lr"] < 30
