"""A hub's quota on the outputs each user keeps there (`data.outputs_quota_mb`): a job whose outputs would take
its owner over it keeps none, and the listing says why; deleted outputs free the quota; a restarted hub counts
what its manifests say."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from federation.model import Job, JobSpec, JobState
from hub.outputs import Outputs

ALICE = "spiffe://eurohpc.test/user/antenna-a/alice"
BOB = "spiffe://eurohpc.test/user/antenna-a/bob"


def ended(job_id: str, owner: str, size: int, folder: Path) -> Job:
    work = folder / job_id
    work.mkdir(parents=True)
    (work / "result.bin").write_bytes(b"x" * size)
    return Job(id=job_id, spec=JobSpec(argv=("true",), outputs=("result.bin",)), state=JobState.COMPLETED,
               owner=owner, updated_at=time.time())


def test_outputs_over_a_users_quota_are_not_kept_and_others_are_not_affected(tmp_path):
    outputs = Outputs(tmp_path / "outputs", quota_bytes=1000)
    first = ended("antenna-a-one", ALICE, 700, tmp_path / "jobs")
    assert outputs.collect(first, tmp_path / "jobs" / first.id)["error"] == ""
    second = ended("antenna-a-two", ALICE, 400, tmp_path / "jobs")
    manifest = outputs.collect(second, tmp_path / "jobs" / second.id)
    assert manifest["files"] == []
    assert f"{ALICE} already keeps 700 bytes of outputs at this hub, over its limit of 1000 bytes per user" in \
        manifest["error"]
    ready, files, error = outputs.listing(second)
    assert ready and files == [] and "none was kept" in error
    other = ended("antenna-a-three", BOB, 400, tmp_path / "jobs")
    assert outputs.collect(other, tmp_path / "jobs" / other.id)["error"] == ""  # Bob has his own quota
    assert (outputs.held(ALICE), outputs.held(BOB)) == (700, 400)


def test_deleted_outputs_free_the_quota_and_a_restart_counts_the_manifests(tmp_path):
    outputs = Outputs(tmp_path / "outputs", quota_bytes=1000)
    first = ended("antenna-a-one", ALICE, 700, tmp_path / "jobs")
    outputs.collect(first, tmp_path / "jobs" / first.id)
    assert Outputs(tmp_path / "outputs", quota_bytes=1000).held(ALICE) == 700  # a restarted hub reads them
    outputs.forget(first.id)  # retention, or the job's record purged
    assert outputs.held(ALICE) == 0
    second = ended("antenna-a-two", ALICE, 900, tmp_path / "jobs")
    assert outputs.collect(second, tmp_path / "jobs" / second.id)["error"] == ""
    # Collected again (a hub that crashed before clearing its mark does it again): counted once.
    assert outputs.collect(second, tmp_path / "jobs" / second.id)["error"] == ""
    assert outputs.held(ALICE) == 900


def test_a_failed_collection_gives_its_reservation_back(tmp_path, monkeypatch):
    outputs = Outputs(tmp_path / "outputs", quota_bytes=1000)
    job = ended("antenna-a-one", ALICE, 700, tmp_path / "jobs")
    monkeypatch.setattr("hub.outputs.os.fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left")))
    with pytest.raises(OSError):
        outputs.collect(job, tmp_path / "jobs" / job.id)
    assert outputs.held(ALICE) == 0


def test_no_quota_by_default(tmp_path):
    outputs = Outputs(tmp_path / "outputs")
    job = ended("antenna-a-big", ALICE, 5000, tmp_path / "jobs")
    assert outputs.collect(job, tmp_path / "jobs" / job.id)["error"] == ""
