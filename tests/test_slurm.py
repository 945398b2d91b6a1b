"""Through antenna, hub and a real (private) Slurm: every final state, GPUs, logs, restarts, outages."""

from __future__ import annotations

import asyncio
import subprocess

import orjson
import pytest

from federation.config import PartitionConfig
from federation.model import JobSpec, JobState
from tests.conftest import eventually, slurm_hub_config


def sh(script: str, **kw) -> JobSpec:
    return JobSpec(argv=("sh", "-c", script), **{"walltime_s": 300, **kw})


def squeue(lab) -> list[dict]:
    out = subprocess.run(["squeue", "--json"], env=lab.env, capture_output=True, text=True, timeout=30, check=True)
    return orjson.loads(out.stdout)["jobs"]


async def _running(client, job_id):
    job = await client.get(job_id)
    assert not job.final, f"{job_id} ended {job.state.name}: {job.reason}"
    return job if job.state is JobState.RUNNING else None


async def test_completed_with_logs_and_slurm_tag(slurm_fed, slurm_lab):
    client = slurm_fed.client("alice")
    job = await client.submit(sh("echo hello from $AIFED_SITE; echo oops >&2"))
    done = await client.wait(job.id)
    assert done.state is JobState.COMPLETED and done.exit_code == 0, done
    assert [t.state for t in done.history][:3] == [JobState.PENDING, JobState.FORWARDED, JobState.QUEUED]
    assert JobState.RUNNING in [t.state for t in done.history]
    out = b"".join([c.data async for c in client.logs(job.id)])
    assert b"hello from leonardo\n" in out and b"oops\n" in out
    tagged = [j for j in squeue(slurm_lab) if j["comment"] == f"aifed:{job.id}"]
    assert len(tagged) == 1 and tagged[0]["name"] == job.id


async def test_failed_keeps_exit_code(slurm_fed):
    client = slurm_fed.client("alice")
    done = await client.wait((await client.submit(sh("exit 3"))).id)
    assert done.state is JobState.FAILED and done.exit_code == 3, done


async def test_gpu_request_is_honoured(slurm_fed):
    client = slurm_fed.client("alice")
    job = await client.submit(sh("echo CVD=$CUDA_VISIBLE_DEVICES", gpus=2, partition="gpu"))
    done = await client.wait(job.id)
    assert done.state is JobState.COMPLETED, done
    assert b"".join([c.data async for c in client.logs(job.id)]) == b"CVD=0,1\n"


async def test_script_job_with_arguments_and_ignored_directives(slurm_fed):
    """A script's own #SBATCH lines do not override the request (here: the partition)."""
    client = slurm_fed.client("alice")
    script = "#!/bin/sh\n#SBATCH --partition=nonexistent\necho \"args: $1 $2\"\n"
    job = await client.submit(JobSpec(script=script, script_args=("a b", "c"), walltime_s=60, partition="debug"))
    done = await client.wait(job.id)
    assert done.state is JobState.COMPLETED and done.partition == "debug", done
    assert b"".join([c.data async for c in client.logs(job.id)]) == b"args: a b c\n"


async def test_cancel_running(slurm_fed):
    client = slurm_fed.client("alice")
    job = await client.submit(sh("sleep 120"))
    await eventually(lambda: _running(client, job.id), timeout=30)
    await client.cancel(job.id)
    done = await client.wait(job.id)
    assert done.state is JobState.CANCELLED, done


async def test_logs_follow_while_running(slurm_fed):
    client = slurm_fed.client("alice")
    job = await client.submit(sh("for i in 1 2 3; do echo tick $i; sleep 0.5; done"))
    data = b"".join([c.data async for c in client.logs(job.id, follow=True)])
    assert data == b"tick 1\ntick 2\ntick 3\n"


async def test_sbatch_rejection_becomes_the_reason(slurm_fed):
    """More memory than the node has: sbatch refuses, and its own words are the job's reason."""
    client = slurm_fed.client("alice")
    done = await client.wait((await client.submit(sh("true", memory_mb=10_000_000))).id)
    assert done.state is JobState.FAILED, done
    assert done.reason.startswith("Slurm refused the job: ") and "node configuration is not available" in done.reason


async def test_hub_refuses_to_start_with_a_partition_slurm_does_not_have(test_pki, tmp_path, slurm_lab):
    from hub.daemon import HubDaemon
    parts = (PartitionConfig("gpu", "A100", 8, 3600), PartitionConfig("ghost", "", 0, 3600))
    with pytest.raises(RuntimeError, match=r"Slurm has no partition ghost \(it has: debug, gpu\)"):
        await HubDaemon(slurm_hub_config(test_pki, tmp_path, slurm_lab, partitions=parts)).start()


async def test_more_gpus_than_a_node_has_is_refused_before_forwarding(slurm_fed):
    """The advert's GPU total comes from sinfo (8), so 16 GPUs are refused at submit, nothing stored."""
    import grpc
    client = slurm_fed.client("alice")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.submit(sh("true", gpus=16))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "at most 8 GPUs" in err.value.details()
    assert slurm_fed.hubs["leonardo"].core.journal.count() == 0


async def test_hub_restart_mid_job_follows_it_to_the_end(slurm_fed, slurm_lab):
    client = slurm_fed.client("alice")
    job = await client.submit(sh("sleep 6; echo survived"))
    await eventually(lambda: _running(client, job.id), timeout=30)
    await slurm_fed.hubs["leonardo"].stop()
    await asyncio.sleep(1)
    await slurm_fed.start_hub("leonardo", config=slurm_fed.hubs["leonardo"].config)
    done = await client.wait(job.id)
    assert done.state is JobState.COMPLETED, done
    assert b"survived" in b"".join([c.data async for c in client.logs(job.id)])
    assert len([j for j in squeue(slurm_lab) if j["name"] == job.id]) == 1  # never submitted twice


async def test_restart_between_sbatch_and_journal_adopts_the_slurm_job(test_pki, tmp_path, slurm_lab):
    """The hub crashed after sbatch but before journaling the Slurm id: it finds the job by its tag."""
    import time
    from federation.journal import Journal
    from federation.model import Job
    from hub.daemon import HubDaemon
    config = slurm_hub_config(test_pki, tmp_path, slurm_lab)
    job_id = f"antenna-a-adopt{int(time.time())}"
    folder = config.state_dir / "jobs" / job_id
    folder.mkdir(parents=True)
    (folder / "submitting").write_bytes(b"")
    subprocess.run(["sbatch", "--parsable", f"--job-name={job_id}", f"--comment=aifed:{job_id}", "-p", "debug",
                    "-t", "5", f"--output={folder / 'stdout'}", "--wrap", "echo adopted"], env=slurm_lab.env,
                   check=True, capture_output=True)
    journal = Journal(config.state_dir / "hub.sqlite")
    now = time.time()
    journal.insert(Job(id=job_id, spec=sh("echo adopted"), state=JobState.QUEUED, site="leonardo",
                       partition="debug", owner="spiffe://eurohpc.test/user/antenna-a/alice", antenna="antenna-a",
                       created_at=now, updated_at=now), f"antenna-a/{job_id}")
    journal.close()
    async with HubDaemon(config) as hub:
        done = await eventually(lambda: (j := hub.core.journal.get(job_id)).final and j, timeout=30)
    assert done.state is JobState.COMPLETED, done
    assert len([j for j in squeue(slurm_lab) if j["name"] == job_id]) == 1


async def test_vanished_slurm_job_is_lost(test_pki, tmp_path, slurm_lab):
    import time
    from federation.journal import Journal
    from federation.model import Job
    from hub.daemon import HubDaemon
    config = slurm_hub_config(test_pki, tmp_path, slurm_lab)
    journal = Journal(config.state_dir / "hub.sqlite")
    now = time.time()
    journal.insert(Job(id="antenna-a-vanished", spec=sh("true"), state=JobState.RUNNING, site="leonardo",
                       partition="gpu", owner="spiffe://eurohpc.test/user/antenna-a/alice", antenna="antenna-a",
                       created_at=now, updated_at=now), "antenna-a/vanished", backend_ref="999999")
    journal.close()
    async with HubDaemon(config) as hub:
        done = await eventually(lambda: (j := hub.core.journal.get("antenna-a-vanished")).final and j, timeout=30)
    assert done.state is JobState.LOST and "999999 vanished" in done.reason


async def test_slurmctld_down_jobs_wait_at_the_hub_and_go_out_when_it_returns(slurm_fed, slurm_lab):
    client = slurm_fed.client("alice")
    core = slurm_fed.antennas["antenna-a"].core
    slurm_lab.stop_controller()
    try:
        await eventually(lambda: core.sites["leonardo"].advert.degraded, timeout=30)
        assert "unreachable" in core.sites["leonardo"].advert.status_message
        job = await client.submit(sh("echo after the outage", partition="debug"))
        queued = await eventually(lambda: _at_hub(slurm_fed, job.id), timeout=30)
        assert queued.state is JobState.QUEUED  # accepted and journaled by the hub, waiting for Slurm
        await asyncio.sleep(2)
        assert slurm_fed.hubs["leonardo"].core.journal.get(job.id).state is JobState.QUEUED
    finally:
        await asyncio.to_thread(slurm_lab.start_controller)
    done = await client.wait(job.id)
    assert done.state is JobState.COMPLETED, done
    await eventually(lambda: not core.sites["leonardo"].advert.degraded, timeout=30)


def _at_hub(fed, job_id):
    return fed.hubs["leonardo"].core.journal.get(job_id)


@pytest.mark.slow
async def test_timeout_at_slurm_time_limit(slurm_fed):
    """Slurm's time limits are whole minutes: a 1-minute job running `sleep 300` ends TIMEOUT."""
    client = slurm_fed.client("alice")
    done = await asyncio.wait_for(client.wait((await client.submit(sh("sleep 300", walltime_s=60))).id), 150)
    assert done.state is JobState.TIMEOUT, done
