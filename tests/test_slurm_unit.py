"""The Slurm backend with its one seam replaced: the commands it runs, and how it reads Slurm's answers."""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import orjson
import pytest

from federation.config import PartitionConfig
from federation.model import Job, JobSpec, JobState
from hub.commands import CommandError, Result, SchedulerUnavailable
from hub.slurm import (SLURM_STATES, SlurmBackend, array_tasks, entry_keys, exit_from_sacct, exit_from_status,
                       gpu_count, index_ranges, keyed, map_state, neutralize_directives, task_count)


class FakeRunner:
    """Records each argv and answers from a script of (predicate, answer) rules; answers may be exceptions."""

    def __init__(self):
        self.env = {"PATH": "/usr/bin:/bin"}
        self.calls: list[tuple[list[str], dict | None]] = []
        self.rules: list = []

    def on(self, first: str, answer) -> None:
        self.rules.append((first, answer))

    async def run(self, argv, *, env=None, timeout=None, check=True):
        self.calls.append((list(argv), env))
        for first, answer in self.rules:
            if " ".join(argv).startswith(first):
                if isinstance(answer, Exception):
                    raise answer
                return answer(argv) if callable(answer) else answer
        return Result("", "")


def squeue(*jobs) -> Result:
    return Result(orjson.dumps({"jobs": list(jobs), "errors": []}).decode(), "")


def make(tmp_path, runner) -> tuple[SlurmBackend, list]:
    changes = []
    backend = SlurmBackend((PartitionConfig("gpu", "A100", 8, 3600),), changes.append, tmp_path, runner,
                           accounts={"proj-x": "acct_x"})
    return backend, changes


def job(**spec) -> Job:
    return Job(id="antenna-a-abc123", spec=JobSpec(**{"walltime_s": 5400, **spec}), state=JobState.QUEUED,
               partition="gpu", site="leonardo", created_at=time.time())


def test_every_documented_state_maps_and_unknown_codes_warn(caplog):
    assert map_state("CANCELLED by 0") is JobState.CANCELLED
    assert map_state("OUT_OF_MEMORY") is JobState.FAILED
    assert map_state("COMPLETING") is JobState.RUNNING
    assert all(isinstance(v, JobState) for v in SLURM_STATES.values())
    with caplog.at_level(logging.WARNING):
        assert map_state("WIBBLE") is JobState.UNKNOWN
    assert "unknown Slurm job state 'WIBBLE'" in caplog.text
    assert not JobState.UNKNOWN.final


@pytest.mark.parametrize("text,code", [("0:0", 0), ("3:0", 3), ("0:9", 137), ("0:15", 143), ("x", None)])
def test_sacct_exit_codes(text, code):
    assert exit_from_sacct(text) == code


def test_status_exit_codes_and_gres():
    assert (exit_from_status(768), exit_from_status(9), exit_from_status(0)) == (3, 137, 0)
    assert gpu_count("gpu:8") == 8 and gpu_count("gpu:a100:4(S:0-1)") == 4 and gpu_count("gres:gpu:2") == 2
    assert gpu_count("gpu:a100:2,gpu:h100:1") == 3 and gpu_count("") == 0 and gpu_count("mps:100") == 0


def test_directives_are_neutralized_and_a_shebang_added():
    out = neutralize_directives("#SBATCH -p x\n#PBS -J 0-3\n#BSUB -q x\necho hi\n#SBATCH not-a-directive-anymore\n")
    assert out.startswith("#!/bin/sh\n") and "echo hi" in out
    assert not any(line.startswith(("#SBATCH", "#PBS", "#BSUB")) for line in out.splitlines())


async def test_a_cancel_during_sbatch_is_delivered_once_slurm_names_the_job(tmp_path):
    import asyncio
    runner = FakeRunner()

    async def slow_sbatch(argv):
        await asyncio.sleep(0.3)
        return Result("31\n", "")

    class SlowRunner(FakeRunner):
        async def run(self, argv, **kw):
            if argv[:2] == ["sbatch", "--parsable"]:
                self.calls.append((list(argv), None))
                return await slow_sbatch(argv)
            return await super().run(argv, **kw)

    runner = SlowRunner()
    backend, changes = make(tmp_path, runner)
    j = job(argv=("true",))
    submitting = asyncio.create_task(backend.submit(j))
    await asyncio.sleep(0.1)
    assert await backend.cancel(j.id)
    await submitting
    await asyncio.sleep(0.1)
    assert ["scancel", "31"] in [a for a, _ in runner.calls]


async def test_an_unanswered_sbatch_is_looked_up_before_it_is_sent_again(tmp_path):
    runner = FakeRunner()
    runner.on("sbatch --parsable", SchedulerUnavailable(["sbatch"], -9, "timed out after 30s"))
    backend, changes = make(tmp_path, runner)
    j = job(argv=("true",))
    await backend.submit(j)
    runner.rules = [("scontrol ping", Result("Slurmctld(primary) at vm is UP\n", "")),
                    ("squeue --json", squeue({"job_id": 77, "job_state": "RUNNING", "comment": f"aifed:{j.id}",
                                              "name": j.id})),
                    ("sbatch --parsable", Result("78\n", ""))]
    await backend.poll()
    assert changes[0].ref == "77"  # adopted, not submitted twice
    assert sum(1 for a, _ in runner.calls if a[:2] == ["sbatch", "--parsable"]) == 1


async def test_sacct_name_filter_is_checked_here(tmp_path):
    """jobcomp/filetxt ignores --name: an unrelated job must never be adopted."""
    runner = FakeRunner()
    runner.on("squeue --json", squeue())
    runner.on("sacct", Result("48|someone-else\n49|antenna-a-abc123\n", ""))
    backend, _ = make(tmp_path, runner)
    assert await backend._find_by_tag("antenna-a-abc123") == "49"
    assert await backend._find_by_tag("antenna-a-zzz") is None


async def test_sbatch_argv_carries_the_request_and_the_tag_and_no_shell(tmp_path):
    runner = FakeRunner()
    runner.on("sbatch --parsable", Result("4242\n", ""))
    backend, changes = make(tmp_path, runner)
    j = job(argv=("python", "train.py", "; rm -rf /"), gpus=2, cpus=4, memory_mb=2048, project="proj-x",
            env={"HF_HOME": "/data"})
    await backend.submit(j)
    argv, env = runner.calls[-1]
    folder = tmp_path / j.id
    assert argv[:4] == ["sbatch", "--parsable", "--ignore-pbs", f"--job-name={j.id}"]
    assert f"--export-file={folder / 'job.env'}" in argv and "--export=AIFED_JOB_ID" in argv
    assert {f"--comment=aifed:{j.id}", "--partition=gpu", "--time=01:30:00", "--cpus-per-task=4", "--gres=gpu:2",
            "--mem=2048M", "--account=acct_x", f"--output={folder / 'stdout'}"} <= set(argv)
    assert argv[-4:] == [str(folder / "job.sh"), "python", "train.py", "; rm -rf /"]  # arguments, not shell text
    assert (folder / "job.sh").read_text().endswith('exec "$@"\n')
    assert env is None  # sbatch runs in the runner's clean environment; the user's variables go in a file
    job_env = dict(kv.split("=", 1) for kv in (folder / "job.env").read_text().split("\0") if kv)
    assert job_env["HF_HOME"] == "/data" and job_env["AIFED_JOB_ID"] == j.id and job_env["HOME"] == str(folder)
    assert changes[-1].state is JobState.QUEUED and changes[-1].ref == "4242"


async def test_sbatch_refusal_fails_the_job_with_its_words(tmp_path):
    runner = FakeRunner()
    runner.on("sbatch --parsable", CommandError(["sbatch"], 1, "sbatch: error: Invalid account"))
    backend, changes = make(tmp_path, runner)
    await backend.submit(job(argv=("true",)))
    assert changes[-1].state is JobState.FAILED and changes[-1].reason == \
        "Slurm refused the job: sbatch: error: Invalid account"


async def test_controller_down_keeps_the_job_and_submits_it_later(tmp_path):
    runner = FakeRunner()
    down = SchedulerUnavailable(["sbatch"], 1, "Unable to contact slurm controller (connect failure)")
    runner.on("sbatch --parsable", down)
    backend, changes = make(tmp_path, runner)
    await backend.submit(job(argv=("true",)))
    assert changes == [] and not backend.health().ok
    runner.rules.clear()
    runner.on("scontrol ping", Result("Slurmctld(primary) at vm is UP\n", ""))
    runner.on("sbatch --parsable", Result("7\n", ""))
    runner.on("squeue --json", squeue({"job_id": 7, "job_state": "PENDING", "state_reason": "Priority"}))
    await backend.poll()
    assert backend.health().ok and changes[0].ref == "7"


async def test_poll_reports_running_then_final_from_sacct(tmp_path):
    runner = FakeRunner()
    runner.on("scontrol ping", Result("Slurmctld(primary) at vm is UP\n", ""))
    backend, changes = make(tmp_path, runner)
    assert await backend.recover(job(argv=("true",)), "99") is None
    runner.on("squeue --json", squeue({"job_id": 99, "job_state": "RUNNING"}, {"job_id": 5, "job_state": "RUNNING"}))
    await backend.poll()
    assert [c.state for c in changes] == [JobState.RUNNING]
    runner.rules.insert(0, ("squeue --json", squeue()))
    runner.on("sacct", Result("99|FAILED|2:0\n", ""))
    await backend.poll()
    assert (changes[-1].state, changes[-1].exit_code) == (JobState.FAILED, 2)
    sacct = [a for a, _ in runner.calls if a[0] == "sacct"][-1]
    assert "-j" in sacct and "99" in sacct


async def test_vanished_job_is_lost_and_squeue_errors_mean_unavailable(tmp_path):
    runner = FakeRunner()
    runner.on("scontrol ping", Result("Slurmctld(primary) at vm is UP\n", ""))
    runner.on("squeue --json", Result(orjson.dumps({"jobs": [], "errors": [{"error": "boom"}]}).decode(), ""))
    backend, changes = make(tmp_path, runner)
    await backend.recover(job(argv=("true",)), "123")
    with pytest.raises(SchedulerUnavailable, match="boom"):
        await backend.poll()
    assert changes == []
    runner.rules[1] = ("squeue --json", squeue())
    await backend.poll()  # sacct answers nothing either
    assert changes[-1].state is JobState.LOST and "123 vanished" in changes[-1].reason


async def test_recover_finds_a_submitted_job_by_its_tag_and_resubmits_one_that_never_went(tmp_path):
    runner = FakeRunner()
    runner.on("sacct", Result("", ""))
    runner.on("squeue --json", squeue({"job_id": 55, "job_state": "PENDING", "comment": "aifed:antenna-a-abc123",
                                       "name": "antenna-a-abc123"}))
    backend, changes = make(tmp_path, runner)
    runner.on("scontrol ping", Result("Slurmctld(primary) at vm is UP\n", ""))
    runner.on("sbatch --parsable", Result("56\n", ""))
    j = job(argv=("true",))
    (tmp_path / j.id).mkdir()
    (tmp_path / j.id / "submitting").write_bytes(b"")
    assert await backend.recover(j, "") is None
    other = Job(id="antenna-a-never1", spec=j.spec, state=JobState.QUEUED, partition="gpu")
    assert await backend.recover(other, "") is None
    assert not runner.calls  # nothing asked of Slurm before the first poll: slurmctld may be down at start
    await backend.poll()
    assert backend._tracked[j.id].slurm_id == "55"  # found by its tag
    assert any(c.job_id == "antenna-a-never1" and c.ref == "56" for c in changes)  # no mark: sent now
    assert sum(1 for a, _ in runner.calls if a[:2] == ["sbatch", "--parsable"]) == 1


async def test_estimates_are_parsed_and_cached(tmp_path):
    runner = FakeRunner()
    start = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() + 600))
    runner.on("sbatch --test-only", Result("", f"sbatch: Job 3 to start at {start} using 1 processors on nodes vm"))
    backend, _ = make(tmp_path, runner)
    assert 590 <= await backend.estimate_wait("gpu", 2, 60) <= 601
    assert 590 <= await backend.estimate_wait("gpu", 2, 60) <= 601
    assert sum(1 for a, _ in runner.calls if "--test-only" in a) == 1
    runner.rules = [("sbatch --test-only", CommandError(["sbatch"], 1, "Requested node configuration is not available"))]
    assert await backend.estimate_wait("gpu", 9, 60) == float("inf")


async def test_the_user_maps_account_wins_over_the_project_mapping(tmp_path):
    runner = FakeRunner()
    runner.on("sbatch --parsable", Result("4243\n", ""))
    backend, _ = make(tmp_path, runner)
    mapped = replace(job(argv=("true",), project="proj-x"), account="ext_alice")
    await backend.submit(mapped)
    argv, _ = runner.calls[-1]
    assert "--account=ext_alice" in argv and "--account=acct_x" not in argv
    plain = replace(job(argv=("true",)), id="antenna-a-abc124")
    await backend.submit(plain)
    assert not any(a.startswith("--account") for a in runner.calls[-1][0])  # no map, no project: none


# -- job arrays: the jobs of one batch that ask for the same resources go in one sbatch --------------------------

UP = Result("Slurmctld(primary) at vm is UP\n", "")


def jobs_of(n: int, **spec) -> list[Job]:
    return [replace(job(**{"argv": ("echo", f"job {i}"), **spec}), id=f"antenna-a-arr{i}") for i in range(n)]


@pytest.mark.parametrize("text,tasks", [("1-3,7", [1, 2, 3, 7]), ("0-8:4%2", [0, 4, 8]), ("5", [5]), ("", [])])
def test_squeue_array_task_strings(text, tasks):
    assert array_tasks(text) == tasks


def test_squeue_entries_stand_for_jobs_tasks_and_pending_tasks_together():
    assert entry_keys({"job_id": 7, "array_job_id": 0}) == ["7"]
    assert entry_keys({"job_id": 12, "array_job_id": 9, "array_task_id": 3}) == ["9_3"]
    assert entry_keys({"job_id": 9, "array_job_id": 9, "array_task_id": None, "array_task_string": "1-2,4"}) == [
        "9_1", "9_2", "9_4"]
    assert entry_keys({"job_id": 9, "array_job_id": 9, "array_task_string": "x-y"}) == []  # unreadable: warned


async def test_same_shaped_jobs_go_as_one_array_and_the_odd_one_alone(tmp_path):
    runner = FakeRunner()
    runner.on("sbatch --parsable --ignore-pbs --job-name=array-", Result("40\n", ""))
    runner.on("sbatch --parsable", Result("50\n", ""))
    backend, changes = make(tmp_path, runner)
    jobs = jobs_of(3)
    odd = replace(job(argv=("true",), gpus=2), id="antenna-a-odd")
    await backend.submit_many([*jobs, odd])
    sbatches = [a for a, _ in runner.calls if a[0] == "sbatch"]
    assert len(sbatches) == 2
    array = next(a for a in sbatches if "--array=0-2" in a)
    assert "--partition=gpu" in array and "--time=01:30:00" in array
    folder = tmp_path / ".arrays" / next(a.split("=", 1)[1] for a in array if a.startswith("--job-name="))
    assert f"--output={folder}/%a/stdout" in array
    assert {c.job_id: c.ref for c in changes} == {**{j.id: f"40_{i}" for i, j in enumerate(jobs)},
                                                  odd.id: "50"}
    for i, j in enumerate(jobs):  # task i runs job i's launcher, from the job's folder
        assert (folder / str(i)).resolve() == (tmp_path / j.id).resolve()
        assert (tmp_path / j.id / "submitting").read_text().split() == [folder.name, str(i)]
    task = (folder / "task.sh").read_text()
    assert 'cd -P' in task and "exec /bin/sh ./.aifed-launch.sh" in task


async def test_an_array_task_runs_its_own_command_and_environment_literally(tmp_path):
    """What the launcher does, run by a real shell: arguments and values reach the job as they are."""
    import os
    import subprocess
    runner = FakeRunner()
    runner.on("sbatch --parsable", Result("40\n", ""))
    backend, _ = make(tmp_path, runner)
    nasty = "it's $HOME; `touch pwned` \"q\" \\ * \n next"
    jobs = [replace(job(argv=("sh", "-c", 'printf "%s|%s|%s" "$1" "$FOO" "${SLURM_ARRAY_TASK_ID-unset}"', "x",
                                nasty), env={"FOO": nasty}), id="antenna-a-lit0"),
            replace(job(argv=("true",)), id="antenna-a-lit1")]
    await backend.submit_many(jobs)
    folder = tmp_path / jobs[0].id
    out = subprocess.run(["/bin/sh", str(folder / ".aifed-launch.sh")], cwd=folder, capture_output=True, text=True,
                         env={"PATH": os.environ["PATH"], "SLURM_ARRAY_TASK_ID": "0"}, check=True)
    assert out.stdout == f"{nasty}|{nasty}|unset"
    assert not (folder / "pwned").exists()


async def test_a_refused_array_is_sent_job_by_job_with_slurms_own_answer_each(tmp_path):
    runner = FakeRunner()
    runner.on("sbatch --parsable --ignore-pbs --job-name=array-", CommandError(
        ["sbatch"], 1, "sbatch: error: Batch job submission failed: Invalid job array specification"))
    numbers = iter(range(60, 70))
    runner.on("sbatch --parsable", lambda argv: Result(f"{next(numbers)}\n", ""))
    backend, changes = make(tmp_path, runner)
    jobs = jobs_of(3)
    await backend.submit_many(jobs)
    assert [c.ref for c in changes] == ["60", "61", "62"]
    assert not any((tmp_path / j.id / "submitting").read_text() for j in jobs)  # each its own sbatch now
    assert not list((tmp_path / ".arrays").iterdir())


async def test_an_unanswered_array_sbatch_is_found_by_the_arrays_name_not_sent_again(tmp_path):
    runner = FakeRunner()
    runner.on("sbatch --parsable", SchedulerUnavailable(["sbatch"], -9, "timed out after 30s"))
    backend, changes = make(tmp_path, runner)
    jobs = jobs_of(2)
    await backend.submit_many(jobs)
    assert changes == [] and not backend.health().ok
    name = (tmp_path / jobs[0].id / "submitting").read_text().split()[0]
    runner.rules = [("scontrol ping", UP),
                    ("squeue --json", squeue({"job_id": 81, "array_job_id": 80, "array_task_id": 0,
                                              "job_state": "RUNNING", "name": name, "comment": f"aifed:{name}"},
                                             {"job_id": 80, "array_job_id": 80, "array_task_string": "1",
                                              "job_state": "PENDING", "name": name, "comment": f"aifed:{name}"})),
                    ("sbatch --parsable", Result("99\n", ""))]
    await backend.poll()
    assert [(c.job_id, c.ref) for c in changes if c.ref] == [(jobs[0].id, "80_0"), (jobs[1].id, "80_1")]
    assert sum(1 for a, _ in runner.calls if a[:2] == ["sbatch", "--parsable"]) == 1
    assert [c.state for c in changes if c.job_id == jobs[0].id][-1] is JobState.RUNNING


async def test_array_tasks_are_followed_to_their_end_by_their_own_slurm_ids(tmp_path):
    runner = FakeRunner()
    runner.on("scontrol ping", UP)
    backend, changes = make(tmp_path, runner)
    a, b, c = jobs_of(3)
    for j, ref in ((a, "80_0"), (b, "80_1"), (c, "80_2")):
        (tmp_path / j.id).mkdir()
        await backend.recover(j, ref)
    # a started (squeue names its own id); b and c still pending together.
    runner.rules.insert(0, ("squeue --json", squeue(
        {"job_id": 81, "array_job_id": 80, "array_task_id": 0, "job_state": "RUNNING"},
        {"job_id": 80, "array_job_id": 80, "array_task_string": "1-2", "job_state": "PENDING"})))
    await backend.poll()
    assert [(ch.job_id, ch.state) for ch in changes] == [(a.id, JobState.RUNNING)]
    # Then all three left squeue (a hub that was down longer than MinJobAge): a by the id squeue showed, b by the
    # id its task wrote when it started; c never started and nothing knows it.
    (tmp_path / b.id / ".aifed-slurm-job-id").write_text("82\n")
    runner.rules[0] = ("squeue --json", squeue())
    runner.on("sacct", Result("81|COMPLETED|0:0\n82|FAILED|4:0\n", ""))
    await backend.poll()
    sacct = [x for x, _ in runner.calls if x[0] == "sacct"][-1]
    assert sacct[sacct.index("-j") + 1] == "81,82"
    final = {ch.job_id: (ch.state, ch.exit_code) for ch in changes[1:] if ch.state.final}
    assert final[a.id] == (JobState.COMPLETED, 0) and final[b.id] == (JobState.FAILED, 4)
    assert final[c.id][0] is JobState.LOST


async def test_capacity_counts_each_pending_task_of_an_array(tmp_path):
    runner = FakeRunner()
    runner.on("scontrol ping", UP)
    runner.on("sinfo --json", Result(orjson.dumps({"nodes": [{"partitions": ["gpu"], "gres": "gpu:8",
                                                             "gres_used": "gpu:8"}], "errors": []}).decode(), ""))
    runner.on("squeue --json", squeue({"job_id": 9, "array_job_id": 9, "array_task_string": "0-4",
                                       "job_state": "PENDING", "partition": "gpu", "tres_per_node": "gres:gpu:2",
                                       "time_limit": 10}))
    backend, _ = make(tmp_path, runner)
    await backend.refresh_capacity()
    usage = backend.usage()[0]
    assert usage.pending_jobs == 5 and usage.pending_gpu_seconds == 5 * 2 * 600


async def test_array_folders_go_once_none_of_their_jobs_is_followed(tmp_path):
    import os
    runner = FakeRunner()
    runner.on("sbatch --parsable", Result("40\n", ""))
    backend, _ = make(tmp_path, runner)
    jobs = jobs_of(2)
    await backend.submit_many(jobs)
    (folder,) = (tmp_path / ".arrays").iterdir()
    assert backend.sweep_arrays(backend._busy(), min_age_s=0) == 0  # its jobs are followed
    del backend._tracked[jobs[0].id]
    assert backend.sweep_arrays(backend._busy(), min_age_s=0) == 0  # one still is
    del backend._tracked[jobs[1].id]
    assert backend.sweep_arrays(backend._busy(), min_age_s=60) == 0  # too young
    old = time.time() - 120
    os.utime(folder, (old, old), follow_symlinks=False)
    assert backend.sweep_arrays(backend._busy(), min_age_s=60) == 1
    assert not folder.exists() and (tmp_path / jobs[0].id / ".aifed-launch.sh").exists()  # the jobs' folders stay


async def test_a_job_cancelled_while_an_arrays_files_are_written_is_left_out_of_the_array(tmp_path):
    import asyncio
    runner = FakeRunner()
    runner.on("sbatch --parsable", Result("40\n", ""))
    backend, changes = make(tmp_path, runner)
    backend.stage_inputs = lambda job, folder: time.sleep(0.1)  # slow inputs, copied in the worker thread
    jobs = jobs_of(3)
    submitting = asyncio.create_task(backend.submit_many(jobs))
    await asyncio.sleep(0.05)
    assert await backend.cancel(jobs[1].id)  # a CANCELLED change will follow
    await submitting
    await asyncio.sleep(0.05)
    sbatch = next(a for a, _ in runner.calls if a[:2] == ["sbatch", "--parsable"])
    assert "--array=0,2" in sbatch  # task 1 never goes to Slurm: nothing to scancel
    assert not any(a[0] == "scancel" for a, _ in runner.calls)
    assert (jobs[1].id, JobState.CANCELLED) in [(c.job_id, c.state) for c in changes]
    array_folder = next((tmp_path / ".arrays").iterdir())
    assert sorted(p.name for p in array_folder.iterdir() if p.is_symlink()) == ["0", "2"]
    changes.clear()
    runner.on("scontrol ping", UP)
    runner.rules.insert(0, ("squeue --json", squeue({"job_id": 40, "array_job_id": 40, "array_task_string": "0,2",
                                                     "job_state": "PENDING"})))
    await backend.poll()
    assert [(c.job_id, c.state) for c in changes if c.state.final] == []  # tasks 0 and 2 still wait


async def test_a_job_cancelled_while_a_refused_array_is_sent_job_by_job_is_not_submitted(tmp_path):
    import asyncio
    runner = FakeRunner()

    class SlowRunner(FakeRunner):
        async def run(self, argv, **kw):
            if argv[:2] == ["sbatch", "--parsable"] and not any(a.startswith("--array") for a in argv):
                await asyncio.sleep(0.1)
            return await super().run(argv, **kw)

    runner = SlowRunner()
    runner.on("sbatch --parsable --ignore-pbs --job-name=array-", CommandError(["sbatch"], 1, "no arrays here"))
    numbers = iter(range(60, 70))
    runner.on("sbatch --parsable", lambda argv: Result(f"{next(numbers)}\n", ""))
    backend, changes = make(tmp_path, runner)
    jobs = jobs_of(3)
    submitting = asyncio.create_task(backend.submit_many(jobs))
    await asyncio.sleep(0.05)  # the first job's own sbatch is running
    assert await backend.cancel(jobs[2].id)
    await submitting
    assert [(c.job_id, c.ref) for c in changes if c.ref] == [(jobs[0].id, "60"), (jobs[1].id, "61")]
    assert (changes[-1].job_id, changes[-1].state) == (jobs[2].id, JobState.CANCELLED)
    assert sum(1 for a, _ in runner.calls if a[:2] == ["sbatch", "--parsable"]) == 3  # the array, then two


async def test_a_cancel_of_a_job_whose_sbatch_went_unanswered_looks_in_slurm_first(tmp_path):
    import asyncio
    runner = FakeRunner()
    runner.on("sbatch --parsable", SchedulerUnavailable(["sbatch"], -9, "timed out after 30s"))
    backend, changes = make(tmp_path, runner)
    found, lost = jobs_of(2)
    await backend.submit_many([found, lost])
    assert await backend.cancel(found.id) and await backend.cancel(lost.id)
    assert changes == []  # not yet: Slurm may have them
    name = (tmp_path / found.id / "submitting").read_text().split()[0]
    runner.rules = [("scontrol ping", UP),
                    ("squeue --json", squeue({"job_id": 80, "array_job_id": 80, "array_task_string": "0",
                                              "job_state": "PENDING", "name": name, "comment": f"aifed:{name}"})),
                    ("sacct", Result("", ""))]
    await backend.poll()
    await asyncio.sleep(0.05)  # the scancels run as tasks
    assert ["scancel", "80_0"] in [a for a, _ in runner.calls]  # found: cancelled in Slurm
    # The other was in the same array, so it is found too (task 1): squeue here shows only task 0, so the
    # lookup by name still adopts it as 80_1 and cancels it.
    assert ["scancel", "80_1"] in [a for a, _ in runner.calls]
    assert sum(1 for a, _ in runner.calls if a[:2] == ["sbatch", "--parsable"]) == 1  # never sent again
    assert sum(1 for a, _ in runner.calls if a[:2] == ["squeue", "--json"]) == 2  # one lookup for both, one poll


async def test_a_cancel_given_while_an_sbatch_went_unanswered_survives_a_restart(tmp_path):
    """The hub answered the cancel: a restart before Slurm named the job must not let the job run."""
    import asyncio
    runner = FakeRunner()
    runner.on("sbatch --parsable", SchedulerUnavailable(["sbatch"], -9, "timed out after 30s"))
    found, lost = replace(job(argv=("true",)), id="antenna-a-found1"), replace(job(argv=("true",)), id="antenna-a-lost1")
    for j in (found, lost):
        backend, changes = make(tmp_path, runner)
        await backend.submit(j)
        assert await backend.cancel(j.id) and changes == []  # Slurm may have it: nothing to report yet

    # A new hub process (the journal still has both jobs QUEUED, without a Slurm id).
    runner = FakeRunner()
    runner.rules = [("scontrol ping", UP),
                    ("squeue --json", squeue({"job_id": 91, "job_state": "PENDING", "comment": f"aifed:{found.id}",
                                              "name": found.id})),
                    ("sacct", Result("", "")), ("sbatch --parsable", Result("92\n", ""))]
    backend, changes = make(tmp_path, runner)
    for j in (found, lost):
        assert await backend.recover(j, "") is None
    await backend.poll()
    await asyncio.sleep(0.05)  # the scancel runs as a task
    assert ["scancel", "91"] in [a for a, _ in runner.calls]  # Slurm had it: cancelled there
    assert not any(a[:2] == ["sbatch", "--parsable"] for a, _ in runner.calls)  # the other is never sent
    assert (lost.id, JobState.CANCELLED) in [(c.job_id, c.state) for c in changes]

    # Slurm had named it, but the hub stopped before its scancel: the next start cancels it.
    runner = FakeRunner()
    backend, _ = make(tmp_path, runner)
    await backend.recover(found, "91")
    await asyncio.sleep(0.05)
    assert ["scancel", "91"] in [a for a, _ in runner.calls]
    # A job never cancelled is left alone.
    runner = FakeRunner()
    backend, _ = make(tmp_path, runner)
    await backend.recover(replace(found, id="antenna-a-other1"), "93")
    await asyncio.sleep(0.05)
    assert not any(a[0] == "scancel" for a, _ in runner.calls)


async def test_inputs_are_copied_off_the_event_loop_and_a_cancel_meanwhile_sends_nothing(tmp_path):
    import asyncio
    import threading

    from federation.model import InputFile
    runner = FakeRunner()
    runner.on("sbatch --parsable", Result("55\n", ""))
    backend, changes = make(tmp_path, runner)
    copying, release = threading.Event(), threading.Event()

    def stage(job, folder):  # the hub's input copy (the seam), held until the test lets it finish
        copying.set()
        release.wait(5)
    backend.stage_inputs = stage
    inputs = (InputFile("w.bin", "a" * 64, 1),)
    kept, cancelled = (replace(job(argv=("true",), inputs=inputs), id=f"antenna-a-{n}") for n in ("kept1", "gone1"))
    for j in (kept, cancelled):
        copying.clear()
        submitting = asyncio.create_task(backend.submit(j))
        assert await asyncio.to_thread(copying.wait, 5)
        await asyncio.sleep(0.05)  # the event loop runs meanwhile
        assert not submitting.done()
        if j is cancelled:
            assert await backend.cancel(j.id)  # kept until the copy is done
        release.set()
        await submitting
        release.clear()
    sbatches = [a for a, _ in runner.calls if a[:2] == ["sbatch", "--parsable"]]
    assert len(sbatches) == 1 and f"--job-name={kept.id}" in sbatches[0]
    assert (cancelled.id, JobState.CANCELLED) in [(c.job_id, c.state) for c in changes]


async def test_an_answered_cancel_whose_scancel_fails_is_tried_again_at_every_poll(tmp_path):
    """After a restart, the cancel kept in the job's folder goes to Slurm; while slurmctld cannot take it, the
    job is neither forgotten nor handed to a peer hub."""
    import asyncio
    runner = FakeRunner()
    runner.on("sbatch --parsable", SchedulerUnavailable(["sbatch"], -9, "timed out after 30s"))
    backend, _ = make(tmp_path, runner)
    j = job(argv=("true",))
    await backend.submit(j)
    assert await backend.cancel(j.id)

    runner = FakeRunner()  # the restarted hub: Slurm named the job (91), but scancel fails for now
    runner.on("scancel", SchedulerUnavailable(["scancel"], 1, "Unable to contact slurm controller"))
    runner.on("scontrol ping", UP)
    runner.on("squeue --json", squeue({"job_id": 91, "job_state": "PENDING", "comment": f"aifed:{j.id}",
                                       "name": j.id}))
    backend, changes = make(tmp_path, runner)
    await backend.recover(j, "91")
    await asyncio.sleep(0.05)
    assert not await backend.withdraw(j.id)  # not handed on while its cancel is owed
    await backend.poll()
    await backend.poll()
    assert [a for a, _ in runner.calls if a[0] == "scancel"] == [["scancel", "91"]] * 3  # each poll tries again
    runner.rules = [r for r in runner.rules if r[0] != "scancel"]  # slurmctld takes it now
    await backend.poll()
    await backend.poll()
    assert [a for a, _ in runner.calls if a[0] == "scancel"] == [["scancel", "91"]] * 4  # then no more


@pytest.mark.parametrize("indices,text", [([0, 1, 2], "0-2"), ([0, 2], "0,2"), ([1, 2, 3, 5, 7, 8], "1-3,5,7-8"),
                                          ([4], "4")])
def test_array_index_lists(indices, text):
    assert index_ranges(indices) == text


async def test_tasks_of_an_unreadable_pending_list_are_not_called_lost(tmp_path):
    runner = FakeRunner()
    runner.on("scontrol ping", UP)
    backend, changes = make(tmp_path, runner)
    for j, ref in zip(jobs_of(2), ("80_40", "80_41")):
        await backend.recover(j, ref)
    runner.rules.insert(0, ("squeue --json", squeue({"job_id": 80, "array_job_id": 80, "job_state": "PENDING",
                                                     "array_task_string": "1-2,4,6,8-9,11-17,19-20,23-...",
                                                     "array_task_id": None})))
    await backend.poll()
    assert changes == [] and len(backend._tracked) == 2


def test_slurm_commands_list_an_arrays_waiting_tasks_in_full():
    from hub.commands import CommandRunner
    assert CommandRunner().env["SLURM_BITSTR_LEN"] == "0"


@pytest.mark.parametrize("env", [{"CUDA_VISIBLE_DEVICES": "7"}, {"UID": "0"}])
async def test_a_job_setting_what_a_launcher_cannot_set_alike_goes_alone(tmp_path, env):
    runner = FakeRunner()
    runner.on("sbatch --parsable --ignore-pbs --job-name=array-", Result("40\n", ""))
    runner.on("sbatch --parsable", Result("50\n", ""))
    backend, changes = make(tmp_path, runner)
    odd, *rest = jobs_of(3)
    odd = replace(odd, spec=replace(odd.spec, env=env))
    await backend.submit_many([odd, *rest])
    assert {c.job_id: c.ref for c in changes} == {odd.id: "50", rest[0].id: "40_0", rest[1].id: "40_1"}


async def test_an_arrays_waiting_tasks_are_offered_with_estimates_in_their_order(tmp_path):
    """squeue has one start time for an array's tasks waiting together: the first's. The later ones are taken
    to start a time limit apart when each takes the whole partition's GPUs (the balancer moves the last first)."""
    runner = FakeRunner()
    runner.on("scontrol ping", UP)
    backend, _ = make(tmp_path, runner)
    a, b, c = jobs_of(3)
    for j, ref in ((a, "80_0"), (b, "80_1"), (c, "80_2")):
        await backend.recover(j, ref)
    start = time.time() + 3600
    runner.rules.insert(0, ("squeue --json", squeue(
        {"job_id": 81, "array_job_id": 80, "array_task_id": 0, "job_state": "RUNNING", "partition": "gpu"},
        {"job_id": 80, "array_job_id": 80, "array_task_string": "1-2", "job_state": "PENDING",
         "state_reason": "Resources", "start_time": int(start), "partition": "gpu", "tres_per_node": "gres:gpu:8",
         "time_limit": 60})))
    waits = dict(await backend.waiting())
    assert set(waits) == {b.id, c.id}
    assert waits[b.id] == pytest.approx(3600, abs=5) and waits[c.id] == pytest.approx(7200, abs=5)


def test_other_users_arrays_are_counted_not_listed():
    huge = {"job_id": 5, "array_job_id": 5, "array_task_string": "0-999999", "job_state": "PENDING"}
    assert task_count(huge) == 1_000_000
    assert entry_keys(huge, arrays={"80"}) == []  # not one of this hub's arrays: not expanded
    assert keyed([huge, {"job_id": 7, "array_job_id": 0}], arrays=set()) == {"7": {"job_id": 7, "array_job_id": 0}}
