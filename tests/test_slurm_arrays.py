"""Jobs forwarded together that ask for the same resources go to a real Slurm as one job array: each still runs
in its own folder with its own command, environment and GPUs, ends with its own state and exit code, can be
cancelled alone, and is followed across a hub restart without a second sbatch."""

from __future__ import annotations

import asyncio
import subprocess

import orjson

from federation.model import JobSpec, JobState
from hub.slurm import ARRAYS, keyed
from tests.conftest import eventually


def sh(script: str, *args: str, **kw) -> JobSpec:
    return JobSpec(argv=("sh", "-c", script, "job", *args), **{"walltime_s": 300, "partition": "gpu", **kw})


def squeue(lab) -> list[dict]:
    out = subprocess.run(["squeue", "--json"], env=lab.env, capture_output=True, text=True, timeout=30, check=True)
    return orjson.loads(out.stdout)["jobs"]


async def submit_together(client, specs: list[JobSpec]) -> list[str]:
    receipts = await client.submit_many([(spec, "", "") for spec in specs])
    return [r.id for r in receipts]


def refs(fed, job_ids: list[str]) -> list[str]:
    journal = fed.hubs["leonardo"].core.journal
    return [journal.backend_ref(job_id) for job_id in job_ids]


async def log_of(client, job_id: str) -> str:
    return b"".join([c.data async for c in client.logs(job_id)]).decode()


async def test_jobs_sent_together_run_as_one_array_each_as_itself(slurm_fed, slurm_lab):
    client = slurm_fed.client("alice")
    nasty = "it's $HOME; `touch pwned` \"q\""
    show = 'printf "%s|%s|%s|%s|%s" "$1" "$FOO" "${SLURM_ARRAY_TASK_ID-unset}" "$CUDA_VISIBLE_DEVICES" "$(pwd -P)"'
    ids = await submit_together(client, [
        sh(show, nasty, env={"FOO": "first"}, gpus=2),
        sh(show, "plain", env={"FOO": nasty}, gpus=2),
        sh("echo failing; exit 3", gpus=2),
        JobSpec(script="#!/bin/sh\n#SBATCH --partition=nonexistent\necho \"args: $1 $2\"\n", script_args=("a b", "c"),
                walltime_s=300, partition="gpu", gpus=2),
    ])
    await eventually(lambda: all(refs(slurm_fed, ids)), timeout=30)
    arrays = {ref.split("_")[0] for ref in refs(slurm_fed, ids)}
    assert len(arrays) == 1 and all("_" in ref for ref in refs(slurm_fed, ids)), refs(slurm_fed, ids)  # one sbatch
    done = [await client.wait(job_id) for job_id in ids]
    backend = slurm_fed.hubs["leonardo"].core.backend
    for i, (job, arg, foo) in enumerate(zip(done[:2], (nasty, "plain"), ("first", nasty))):
        assert job.state is JobState.COMPLETED and job.exit_code == 0, job
        got, env, task, gpus, cwd = (await log_of(client, job.id)).split("|")
        assert (got, env, task, cwd) == (arg, foo, "unset", str(backend.folder(job.id).resolve())), i
        assert len(gpus.split(",")) == 2, gpus
        assert not (backend.folder(job.id) / "pwned").exists()
    assert done[2].state is JobState.FAILED and done[2].exit_code == 3, done[2]
    assert await log_of(client, done[2].id) == "failing\n"
    assert done[3].state is JobState.COMPLETED and await log_of(client, done[3].id) == "args: a b c\n"
    # Nothing was sent to Slurm under a job's own name: the three are the tasks of the array.
    assert not [e for e in squeue(slurm_lab) if e["name"] in ids]
    assert sorted(k for k in keyed(squeue(slurm_lab)) if k.split("_")[0] in arrays) == sorted(refs(slurm_fed, ids))


async def test_an_aifed_array_keeps_its_own_task_ids_inside_a_slurm_array(slurm_fed):
    client = slurm_fed.client("alice")
    receipts = await client.submit_many([(sh('echo "task $SLURM_ARRAY_TASK_ID of $AIFED_ARRAY_JOB_ID"'), "",
                                          "4-6")])
    ids = [r.id for r in receipts]
    await eventually(lambda: all(refs(slurm_fed, ids)), timeout=30)
    assert len({ref.split("_")[0] for ref in refs(slurm_fed, ids)}) == 1
    array_job = (await client.get(ids[0])).spec.array_job
    for index, job_id in zip((4, 5, 6), ids):
        assert (await client.wait(job_id)).state is JobState.COMPLETED
        assert await log_of(client, job_id) == f"task {index} of {array_job}\n"


async def test_one_pending_task_is_cancelled_alone(slurm_fed, slurm_lab):
    """Each job takes all 8 GPUs: one runs, two wait in Slurm as one pending entry; cancelling the last leaves
    the others alone."""
    client = slurm_fed.client("alice")
    ids = await submit_together(client, [sh("sleep 60", gpus=8) for _ in range(3)])
    await eventually(lambda: all(refs(slurm_fed, ids)), timeout=30)
    await eventually(lambda: _state(client, ids[0], JobState.RUNNING), timeout=30)
    cancelled = await client.cancel(ids[2])
    done = await client.wait(ids[2])
    assert done.state is JobState.CANCELLED, (cancelled, done)
    await asyncio.sleep(2)  # two polls: the others are untouched
    assert (await client.get(ids[0])).state is JobState.RUNNING
    assert (await client.get(ids[1])).state is JobState.QUEUED
    queue = keyed(squeue(slurm_lab))
    assert queue[refs(slurm_fed, ids)[1]]["job_state"] == "PENDING"
    assert refs(slurm_fed, ids)[2] not in queue  # Slurm keeps no trace of it: the hub knew it had cancelled it
    for job_id in ids[:2]:
        await client.cancel(job_id)
    for job_id in ids[:2]:
        assert (await client.wait(job_id)).state is JobState.CANCELLED


async def test_a_restarted_hub_follows_its_array_tasks_to_the_end(slurm_fed, slurm_lab):
    client = slurm_fed.client("alice")
    ids = await submit_together(client, [sh('sleep 5; echo "survived $AIFED_JOB_ID"', gpus=1) for _ in range(3)])
    await eventually(lambda: all(refs(slurm_fed, ids)), timeout=30)
    before = refs(slurm_fed, ids)
    await eventually(lambda: _state(client, ids[0], JobState.RUNNING), timeout=30)
    await slurm_fed.hubs["leonardo"].stop()
    await asyncio.sleep(1)
    await slurm_fed.start_hub("leonardo", config=slurm_fed.hubs["leonardo"].config)
    for job_id in ids:
        done = await client.wait(job_id)
        assert done.state is JobState.COMPLETED, done
        assert await log_of(client, job_id) == f"survived {job_id}\n"
    assert refs(slurm_fed, ids) == before  # followed, never submitted again
    assert not [e for e in squeue(slurm_lab) if e["name"] in ids]
    backend = slurm_fed.hubs["leonardo"].core.backend
    assert len(list((backend.workdir / ARRAYS).iterdir())) == 1
    assert backend.sweep_arrays(backend._busy(), min_age_s=0) == 1  # all three ended: the array's folder goes


async def _state(client, job_id, state):
    job = await client.get(job_id)
    assert not job.final or state.final, f"{job_id} ended {job.state.name}: {job.reason}"
    return job if job.state is state else None
