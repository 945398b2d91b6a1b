"""The Slurm backend: a hub's jobs run on the site's real Slurm cluster.

Submission is `sbatch --parsable` of a script file the hub writes, tagged with the federated job id (`--job-name`
and `--comment=aifed:<id>`). The jobs of one forwarded batch that ask for the same resources go as one Slurm job
array (one `sbatch` for up to `backend.array_size` jobs): task N runs the job linked as N in the array's folder,
from the job's own folder, with its own environment and arguments (quoted literally in a launcher file). States come
from `squeue --json` (filtered here: Slurm 22.05 ignores `-j`), final states of jobs that left the queue from
`sacct -c` (jobcomp works without slurmdbd), cancel is `scancel`. Capacity comes from `sinfo --json` and
`squeue --json` and start estimates from `sbatch --test-only`, all cached and refreshed on a schedule that does
not hammer slurmctld.
While slurmctld cannot be reached, new jobs wait at the hub and go out when it returns, and the hub says it is
degraded. Every command runs through one `CommandRunner`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import os
import re
import secrets
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from federation.config import PartitionConfig
from federation.blobs import fsync_dir
from federation.errors import AifedError
from federation.model import Job, JobState
from federation.timefmt import format_duration
from hub.backend import Backend, Change, Health, OnChange, PartitionUsage
from hub.commands import CommandError, CommandRunner, SchedulerUnavailable

log = logging.getLogger(__name__)

#: Slurm job state (squeue's job_state, sacct's State) -> aifed state. Anything else: UNKNOWN, with a warning.
SLURM_STATES: dict[str, JobState] = {
    "PENDING": JobState.QUEUED, "REQUEUED": JobState.QUEUED, "REQUEUE_HOLD": JobState.QUEUED,
    "REQUEUE_FED": JobState.QUEUED, "RESV_DEL_HOLD": JobState.QUEUED,
    "CONFIGURING": JobState.RUNNING, "RUNNING": JobState.RUNNING, "COMPLETING": JobState.RUNNING,
    "SUSPENDED": JobState.RUNNING, "STOPPED": JobState.RUNNING, "SIGNALING": JobState.RUNNING,
    "STAGE_OUT": JobState.RUNNING, "RESIZING": JobState.RUNNING,
    "COMPLETED": JobState.COMPLETED,
    "FAILED": JobState.FAILED, "OUT_OF_MEMORY": JobState.FAILED, "BOOT_FAIL": JobState.FAILED,
    "NODE_FAIL": JobState.FAILED, "PREEMPTED": JobState.FAILED, "SPECIAL_EXIT": JobState.FAILED,
    "CANCELLED": JobState.CANCELLED, "REVOKED": JobState.CANCELLED,
    "TIMEOUT": JobState.TIMEOUT, "DEADLINE": JobState.TIMEOUT,
}
TAG = "aifed:"
NEVER_FITS = ("Requested node configuration is not available", "Invalid partition", "invalid partition",
              "Requested time limit is invalid", "More processors requested than permitted",
              "Invalid generic resource", "Invalid Trackable RESource")
WITHDRAWING = "withdrawn"  # in a job's folder: aifed holds the job in Slurm to hand it to a peer hub
OFFERABLE = ("Priority", "Resources")  # pending only for its turn: a job held or blocked otherwise is not offered
DEGRADED_WAIT_S = 3600.0  # the start estimate of a site whose controller is down: it queues, but prefer others
_START_AT = re.compile(r"to start at (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)")
_GRES_GPU = re.compile(r"gpu(?::[^:(,]+)?:(\d+)")
ARRAYS = ".arrays"  # in the work folder: one folder per job array; its entry N links to the folder of task N's job
LAUNCHER = ".aifed-launch.sh"  # in a job's folder: sets the job's environment and runs job.sh with its arguments
TASK_ID_FILE = ".aifed-slurm-job-id"  # written by an array task when it starts: its own Slurm job id
CANCELLED_MARK = "cancelled"  # in a job's folder: aifed cancelled this array task
CANCEL_MARK = "cancel-requested"  # in a job's folder: cancelled while its sbatch's outcome was unknown
#: What Slurm tells the tasks of the array a job was grouped into; not the job's own business (an aifed array job
#: gets its own values back from `JobSpec.array_env`).
ARRAY_ENV_VARS = ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MAX",
                  "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP")
_SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: Variables a job with its own sbatch may set but a launcher could not set alike: names a shell keeps for itself
#: (bash, as /bin/sh on some clusters, refuses `export UID=...`), and the GPUs Slurm grants, which an export
#: in the launcher would override. A job that sets one goes with its own sbatch.
_NOT_IN_LAUNCHER = frozenset({
    "UID", "EUID", "PPID", "SHELLOPTS", "BASHOPTS", "BASH_VERSINFO", "BASHPID", "GROUPS", "FUNCNAME", "BASH_ARGV",
    "BASH_ARGC", "BASH_ARGV0", "BASH_SOURCE", "BASH_LINENO", "BASH_COMMAND", "BASH_SUBSHELL", "PIPESTATUS",
    "RANDOM", "SRANDOM", "SECONDS", "LINENO", "EPOCHSECONDS", "EPOCHREALTIME", "HISTCMD", "IFS", "PS4", "ENV",
    "BASH_ENV", "CDPATH", "OPTIND", "OPTARG", "PWD", "OLDPWD", "SHLVL", "POSIXLY_CORRECT",
    "CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL",
    "ZE_AFFINITY_MASK"})
ARGV_SCRIPT = '#!/bin/sh\n# written by aifed: runs the job\'s command without a shell\nexec "$@"\n'


def map_state(slurm_state: str) -> JobState:
    """An aifed state for a Slurm state; UNKNOWN (with a warning) for a code this table does not know."""
    word = slurm_state.split()[0].upper() if slurm_state.strip() else ""
    state = SLURM_STATES.get(word)
    if state is None:
        log.warning("unknown Slurm job state %r: reported as UNKNOWN", slurm_state)
        return JobState.UNKNOWN
    return state


def gpu_count(gres: str) -> int:
    """GPUs in a gres string such as `gpu:8`, `gpu:a100:4(S:0-1)`, `gres:gpu:2` (sum of all gpu entries)."""
    return sum(int(n) for n in _GRES_GPU.findall(gres or ""))


def exit_from_sacct(text: str) -> int | None:
    """`3:0` -> 3; `0:9` (killed by signal 9) -> 137."""
    code, _, sig = text.partition(":")
    if not code.isdigit():
        return None
    return 128 + int(sig) if sig.isdigit() and int(sig) else int(code)


def exit_from_status(raw: int) -> int:
    """squeue's exit_code is a wait status: 768 -> 3; a signal n -> 128 + n."""
    return 128 + (raw & 0x7F) if raw & 0x7F else raw >> 8


def _task_ranges(spec: str) -> list[range]:
    """squeue's `array_task_string` ("1-3,7,9-15:2", maybe with a "%4" limit) as ranges of task indices."""
    out: list[range] = []
    for part in spec.split("%")[0].split(","):
        if not part.strip():
            continue
        bounds, _, step = part.partition(":")
        low, _, high = bounds.partition("-")
        out.append(range(int(low), int(high or low) + 1, int(step or 1)))
    return out


def index_ranges(indices: list[int]) -> str:
    """sbatch's --array list for these task indices (ascending): "0-3,5,7-9"."""
    parts, i = [], 0
    while i < len(indices):
        j = i
        while j + 1 < len(indices) and indices[j + 1] == indices[j] + 1:
            j += 1
        parts.append(str(indices[i]) if i == j else f"{indices[i]}-{indices[j]}")
        i = j + 1
    return ",".join(parts)


def array_tasks(spec: str) -> list[int]:
    """The task indices of squeue's `array_task_string`."""
    return [task for r in _task_ranges(spec) for task in r]


def task_count(entry: dict) -> int:
    """How many jobs one squeue entry stands for (an array's tasks pending together counted each), without
    listing them: other users' arrays may have a million tasks."""
    if not entry.get("array_job_id") or entry.get("array_task_id") is not None:
        return 1
    try:
        return sum(len(r) for r in _task_ranges(str(entry.get("array_task_string") or ""))) or 1
    except ValueError:
        return 1


def entry_keys(entry: dict, arrays: set[str] | None = None) -> list[str]:
    """The Slurm ids that one squeue entry stands for: a job's id; `<array id>_<task index>` for a task of an
    array; one of those per task for an array's tasks that are still pending together (one entry for all of
    them), listed only if the array is one of `arrays` (when given: the arrays this hub follows)."""
    array = int(entry.get("array_job_id") or 0)
    if not array:
        return [str(entry.get("job_id"))]
    if entry.get("array_task_id") is not None:
        return [f"{array}_{entry['array_task_id']}"]
    if arrays is not None and str(array) not in arrays:
        return []
    try:
        return [f"{array}_{task}" for task in array_tasks(str(entry.get("array_task_string") or ""))]
    except ValueError:
        log.warning("squeue: cannot read the tasks %r of array %s", entry.get("array_task_string"), array)
        return []


def keyed(entries: list[dict], arrays: set[str] | None = None) -> dict[str, dict]:
    """squeue's entries by the Slurm ids they stand for (`entry_keys`)."""
    return {key: entry for entry in entries for key in entry_keys(entry, arrays)}


def arrays_of(slurm_ids) -> set[str]:
    """The job arrays among Slurm ids (`<array id>_<task index>`)."""
    return {i.partition("_")[0] for i in slurm_ids if "_" in i}


def neutralize_directives(script: str) -> str:
    """The request, not the script, decides resources: `#SBATCH` (and `#PBS`, `#BSUB`, which sbatch also reads)
    lines become comments Slurm ignores."""
    lines = script.splitlines(keepends=True)
    if not lines or not lines[0].startswith("#!"):
        lines.insert(0, "#!/bin/sh\n")
    return "".join("#AIFED-IGNORED-" + ln[1:] if ln.startswith(_DIRECTIVES) else ln for ln in lines)


_DIRECTIVES = ("#SBATCH", "#PBS", "#BSUB")


def _wait(start: float, now: float) -> float:
    """Seconds until `start`, a time Slurm gives to the second: less than a second is now."""
    return 0.0 if start - now < 1.0 else start - now


@dataclass
class _Tracked:
    job: Job
    slurm_id: str            # `<array id>_<task index>` for a task of a job array
    state: JobState
    task_id: str = ""        # an array task's own Slurm job id, once squeue has shown it


class SlurmBackend(Backend):
    """Drives Slurm through `sbatch`, `squeue`, `sacct`, `scancel`, `sinfo`."""

    submit_concurrency = 16  # sbatch calls in flight: each waits mostly on slurmctld

    def __init__(self, partitions: tuple[PartitionConfig, ...], on_change: OnChange, workdir,
                 runner: CommandRunner, *, accounts: dict[str, str] | None = None, poll_s: float = 2.0,
                 capacity_s: float = 10.0, job_env: dict[str, str] | None = None, array_size: int = 256):
        super().__init__(partitions, on_change, workdir)
        self.runner = runner
        self.accounts = dict(accounts or {})
        self.poll_s, self.capacity_s = poll_s, capacity_s
        self.job_env = dict(job_env or {})
        self.array_size = array_size
        self._tracked: dict[str, _Tracked] = {}            # job id -> its Slurm job
        self._waiting: list[Job] = []                       # not yet accepted by Slurm (controller down)
        self._usage: dict[str, PartitionUsage] = {}
        self._slurm_partitions: set[str] | None = None  # as sinfo last reported them
        self._estimates: dict[tuple[str, int, int], tuple[float, float]] = {}  # shape -> (at, start time)
        self._health = Health()
        self._tasks: list[asyncio.Task] = []
        self._uncertain: set[str] = set()             # an sbatch for it may have reached Slurm unanswered
        self._submitting: set[str] = set()            # its sbatch is running now
        self._cancel_when_submitted: set[str] = set()
        self._owed_scancels: dict[str, str] = {}      # job id -> Slurm id: cancelled here, scancel not yet done
        self._background: set[asyncio.Task] = set()
        self._withdrawn: dict[str, _Tracked] = {}     # held in Slurm, being handed to a peer hub
        self._unreleased: dict[str, _Tracked] = {}    # back in line here, but `scontrol release` has yet to work
        self._wake = asyncio.Event()
        self._lookup_queue: list[dict] | None = None  # squeue, as read for the lookups of one poll
        self._looking_up = False

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Check that Slurm has every partition the hub declares (when slurmctld answers), then follow it."""
        await self._guarded(self.refresh_capacity)
        known = self._slurm_partitions
        missing = sorted(set(self.partitions) - known) if known is not None else []
        if missing:
            raise RuntimeError(f"Slurm has no partition {', '.join(missing)} (it has: {', '.join(sorted(known))}); "
                               "fix [[partitions]] in the hub's config")
        self._tasks = [asyncio.create_task(self._poll_loop(), name="slurm poll"),
                       asyncio.create_task(self._capacity_loop(), name="slurm capacity")]

    async def close(self) -> None:
        for t in [*self._tasks, *self._background]:
            t.cancel()
        await asyncio.gather(*self._tasks, *self._background, return_exceptions=True)
        self.close_files()

    async def _poll_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_s)  # woken early by a submit or cancel
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            await self._guarded(self.poll)

    async def _capacity_loop(self) -> None:
        while True:
            await asyncio.sleep(self.capacity_s)
            await self._guarded(self.refresh_capacity)
            try:
                await asyncio.to_thread(self.sweep_arrays, self._busy())
            except Exception:  # noqa: BLE001 - a folder left behind is only disk
                log.exception("removing finished job arrays' folders failed")

    async def _guarded(self, step) -> None:
        try:
            await step()
        except SchedulerUnavailable as exc:
            self._degraded(exc)
        except Exception:  # noqa: BLE001 - the loop must outlive any one bad answer
            log.exception("slurm %s failed; retrying", step.__name__)

    def _degraded(self, exc: CommandError) -> None:
        if self._health.ok:
            log.warning("Slurm is unreachable: %s", exc.stderr)
        self._health = Health(False, f"Slurm controller unreachable: {exc.stderr}")

    def health(self) -> Health:
        return self._health

    # -- jobs ------------------------------------------------------------------------------------

    async def submit(self, job: Job) -> None:
        withdrawn = self._withdrawn.pop(job.id, None)
        if withdrawn is not None:  # a peer refused it: the held job goes back in line, no second sbatch
            await self._release(withdrawn)
            return
        await self._sbatch(job)

    # -- handing jobs to peer hubs (hub/balance.py) ------------------------------------------------------
    #
    # Withdrawing a pending job: `scontrol hold` (it cannot start from then on), then a look at squeue to be sure
    # it was still pending (a hold does not stop a job that started). The job's folder is marked first: a hub that
    # restarts before the job is journaled MOVING finds the mark on a QUEUED job and releases the hold. A refused
    # hand-off releases it (`submit`); an accepted one cancels it (`discard`). A held job never runs, so the job
    # never runs at both hubs.

    async def waiting(self) -> list[tuple[str, float]]:
        """Each of this hub's jobs pending in Slurm for its turn, with the start Slurm's backfill scheduler expects
        for it (squeue's start_time). A job Slurm has no estimate for yet is not offered."""
        if not self._health.ok:
            return []
        mine = {t.slurm_id: job_id for job_id, t in self._tracked.items() if t.state is JobState.QUEUED}
        if not mine:
            return []
        ours = arrays_of(mine)
        now, out = time.time(), []
        for entry in await self._squeue():
            start = int(entry.get("start_time") or 0)
            if entry.get("job_state") != "PENDING" or entry.get("state_reason") not in OFFERABLE or start <= 0:
                continue
            # An array's tasks still waiting together have one estimate, the first task's; Slurm starts them in
            # order. The k-th is taken to start k spacings later, as if the partition's GPUs went to them in turn.
            spacing = self._task_spacing(entry) if entry.get("array_task_id") is None else 0.0
            for k, key in enumerate(entry_keys(entry, ours)):
                if job_id := mine.get(key):
                    out.append((job_id, max(0.0, start + k * spacing - now)))
        return out

    def _task_spacing(self, entry: dict) -> float:
        """Seconds between the expected starts of an array's waiting tasks: the time limit times the share of the
        partition's GPUs one task takes (one second for tasks without GPUs: only their order is known)."""
        gpus = gpu_count(str(entry.get("tres_per_node", "")))
        partition = self.partitions.get(str(entry.get("partition", "")))
        usage = self._usage.get(str(entry.get("partition", "")))
        total = (usage.gpus_total if usage else 0) or (partition.gpus if partition else 0)
        if not gpus or not total:
            return 1.0
        return 60.0 * int(entry.get("time_limit", 0) or 0) * min(1.0, gpus / total)

    async def withdraw(self, job_id: str) -> bool:
        t = self._tracked.get(job_id)
        if t is None or t.state is not JobState.QUEUED or job_id in self._owed_scancels:
            return False  # (a job cancelled here whose scancel has yet to work is not handed on)
        (self.folder(job_id) / WITHDRAWING).write_bytes(b"")
        try:
            await self.runner.run(["scontrol", "hold", t.slurm_id])
            entry = keyed(await self._squeue(), arrays_of([t.slurm_id])).get(t.slurm_id)
        except CommandError as exc:
            log.info("job %s: Slurm would not hold it (%s); it stays here", job_id, exc.stderr)
            await self._release(t, requeue=False)
            return False
        if entry is None or entry.get("job_state") != "PENDING":  # it started (or ended) meanwhile: undo the hold
            await self._release(t, requeue=False)
            return False
        if self._tracked.get(job_id) is t:
            del self._tracked[job_id]
        self._withdrawn[job_id] = t
        return True

    async def discard(self, job_id: str) -> None:
        t = self._withdrawn.pop(job_id, None)
        if t is not None:  # held, so it cannot run even if this scancel fails; a restart forgets it (MOVED is final)
            await self._scancel(t.slurm_id)
            (self.folder(job_id) / WITHDRAWING).unlink(missing_ok=True)

    def adopt_withdrawn(self, job: Job, ref: str) -> None:
        if ref:
            self._withdrawn[job.id] = _Tracked(job, ref, JobState.QUEUED)

    async def _release(self, t: _Tracked, requeue: bool = True) -> None:
        """Back in line: the job followed again, and its hold lifted (if it was cancelled in Slurm meanwhile, the
        next poll reports that). A release that fails (the controller away) is tried again at every poll, and
        the folder's mark stays until it works, so that a restart releases it too."""
        if requeue:
            t.state = JobState.QUEUED
        self._tracked[t.job.id] = t
        try:
            await self.runner.run(["scontrol", "release", t.slurm_id])
        except CommandError as exc:
            if "already finished" not in exc.stderr and "not pending" not in exc.stderr:
                log.warning("job %s: releasing Slurm job %s failed (%s); trying again", t.job.id, t.slurm_id,
                            exc.stderr)
                self._unreleased[t.job.id] = t
                return
        self._unreleased.pop(t.job.id, None)
        (self.folder(t.job.id) / WITHDRAWING).unlink(missing_ok=True)
        self._wake.set()

    async def _sbatch(self, job: Job) -> None:
        """Submit one job. Every outcome is reported, or the job waits (controller down) to be sent again."""
        folder, spec = self.folder(job.id), job.spec
        folder.mkdir(parents=True, exist_ok=True)
        mark = folder / "submitting"
        if mark.exists() and job.id in self._uncertain:
            # An earlier sbatch for it timed out or lost its answer: Slurm may have it. Look before resubmitting.
            found = await self._find_by_tag(job.id)
            if found:
                self._uncertain.discard(job.id)
                self._adopt(job, found)
                return
            self._uncertain.discard(job.id)
        if job.id in self._cancel_when_submitted:  # cancelled while its earlier sbatch's outcome was unknown
            self._report([self._not_submitted(job.id, "")])
            return
        if not self._health.ok:
            self._waiting.append(job)  # the controller is down: it goes out at the first poll after it returns
            return
        self._submitting.add(job.id)  # from here on a cancel is kept: delivered, or the job is never sent
        if job.spec.inputs:
            try:  # copied in a worker thread: a large input would stall the hub's event loop for seconds
                await self.in_file_thread(self.stage_inputs, job, folder)
            except (OSError, AifedError) as exc:
                self._submitting.discard(job.id)
                self._report([self._not_submitted(job.id, f"could not stage the job's inputs: {exc}")])
                return
            except BaseException:
                self._submitting.discard(job.id)
                raise
            if job.id in self._cancel_when_submitted:  # cancelled while its inputs were copied
                self._submitting.discard(job.id)
                self._report([self._not_submitted(job.id, "")])
                return
        mark.write_bytes(b"")  # from here on, a restart must look in Slurm before resubmitting (by this job's tag)
        script = self._write_script(job, folder)
        # The job's environment travels in a file, never through sbatch's own environment: a user's PATH or
        # LD_PRELOAD must not choose which sbatch the hub runs, and the daemon's variables must not reach jobs.
        env_file = folder / "job.env"
        env_file.write_bytes(b"".join(f"{k}={v}".encode() + b"\0" for k, v in self._job_env(job, folder).items()))
        argv = ["sbatch", "--parsable", "--ignore-pbs", f"--job-name={job.id}", f"--comment={TAG}{job.id}",
                *self._resources(job), f"--chdir={folder}",
                f"--output={folder / 'stdout'}", f"--error={folder / 'stderr'}",
                f"--export-file={env_file}", "--export=AIFED_JOB_ID",
                str(script), *(spec.script_args if spec.script else spec.argv)]
        self._submitting.add(job.id)
        try:
            out = await self.runner.run(argv)
        except SchedulerUnavailable as exc:
            self._degraded(exc)
            self._uncertain.add(job.id)
            self._waiting.append(job)
            log.info("job %s waits at the hub: %s", job.id, exc.stderr)
            return
        except CommandError as exc:
            self.on_change(Change(job.id, JobState.FAILED, reason=f"Slurm refused the job: {exc.stderr}"))
            return
        finally:
            self._submitting.discard(job.id)
        self._adopt(job, out.stdout.strip().split(";")[0])

    def _write_script(self, job: Job, folder: Path) -> Path:
        script = folder / "job.sh"
        script.write_text(neutralize_directives(job.spec.script) if job.spec.script else ARGV_SCRIPT)
        script.chmod(0o700)
        return script

    def _job_env(self, job: Job, folder) -> dict[str, str]:
        spec = job.spec
        return {"PATH": self.runner.env.get("PATH", "/usr/bin:/bin"), **self.job_env, **spec.env, **spec.array_env(),
                "AIFED_JOB_ID": job.id, "AIFED_SITE": job.site, "AIFED_PARTITION": job.partition,
                "AIFED_GPUS": str(spec.gpus), "HOME": str(folder)}

    def _account(self, job: Job) -> str:
        """The hub's user map decides the account; without one, the project mapping in [backend.accounts]."""
        spec = job.spec
        return job.account or (self.accounts.get(spec.project, "") if spec.project else "")

    def _resources(self, job: Job) -> list[str]:
        """sbatch's options for what the job asks for (the same for every job grouped into one array)."""
        spec = job.spec
        argv = [f"--partition={job.partition}", f"--time={format_duration(spec.walltime_s)}",
                "--nodes=1", "--ntasks=1", f"--cpus-per-task={spec.cpus}"]
        if spec.gpus:
            argv.append(f"--gres=gpu:{spec.gpus}")
        if spec.memory_mb:
            argv.append(f"--mem={spec.memory_mb}M")
        if account := self._account(job):
            argv.append(f"--account={account}")
        return argv

    async def submit_many(self, jobs: list[Job], wanted=lambda job: True) -> None:
        """Jobs that ask for the same partition, time, CPUs, GPUs, memory and account go as one job array (up to
        `array_size` per sbatch); the others one by one. A job held for a hand-off, or whose earlier sbatch may
        have reached Slurm, goes alone (`submit`)."""
        singles: list[Job] = []
        shapes: dict[tuple, list[Job]] = {}
        for job in jobs:
            if self.array_size < 2 or job.id in self._withdrawn or job.id in self._uncertain:
                singles.append(job)
            else:
                s = job.spec
                shapes.setdefault((job.partition, s.walltime_s, s.cpus, s.gpus, s.memory_mb, self._account(job)),
                                  []).append(job)
        arrays: list[list[Job]] = []
        for group in shapes.values():
            for i in range(0, len(group), self.array_size):
                chunk = group[i:i + self.array_size]
                (arrays if len(chunk) > 1 else singles).append(chunk if len(chunk) > 1 else chunk[0])
        slots = asyncio.Semaphore(self.submit_concurrency)

        async def one(job: Job) -> None:
            async with slots:
                if wanted(job):
                    await self.submit(job)

        async def array(chunk: list[Job]) -> None:
            async with slots:
                chunk = [job for job in chunk if wanted(job)]
                if len(chunk) > 1:
                    await self._sbatch_array(chunk)
                elif chunk:
                    await self._sbatch(chunk[0])

        await asyncio.gather(*map(one, singles), *map(array, arrays))

    async def _sbatch_array(self, jobs: list[Job]) -> None:
        """Submit jobs of one shape as one Slurm job array: task N runs the job linked as N in the array's folder.
        If Slurm refuses the array, each job is submitted alone, so that each gets Slurm's own answer."""
        if not self._health.ok:
            self._waiting.extend(jobs)
            return
        name = f"array-{secrets.token_hex(6)}"
        folder = self.workdir / ARRAYS / name
        # From now until each job's own sbatch (the array's, or its own) has answered, a cancel is kept for it
        # (`_cancel_when_submitted`) and delivered as soon as Slurm names it; the array's folder is not swept.
        ids = {job.id for job in jobs}
        self._submitting |= ids
        try:
            # Files are written in a worker thread: hundreds of them would stall every RPC of the hub meanwhile.
            ready, alone, failed = await self.in_file_thread(self._prepare_array, name, folder, jobs)
        except Exception:  # noqa: BLE001 - e.g. the array's folder cannot be made: each job goes alone
            log.exception("preparing job array %s failed; its %d jobs go one by one", name, len(jobs))
            ready, alone, failed = [], list(jobs), []
        try:
            gone = {job.id for job in ready if job.id in self._cancel_when_submitted}  # cancelled meanwhile
            self._report([self._not_submitted(job_id, f"could not stage the job's inputs: {why}")
                          for job_id, why in failed] + [self._not_submitted(job_id, "") for job_id in gone])
            tasks = [(index, job) for index, job in enumerate(ready) if job.id not in gone]
            for index, job in enumerate(ready):
                if job.id in gone:  # never sent: its task index is left out of the array
                    (folder / str(index)).unlink(missing_ok=True)
                    (self.folder(job.id) / "submitting").unlink(missing_ok=True)
            if tasks:
                await self._submit_array(name, folder, tasks)
            elif ready:
                shutil.rmtree(folder, ignore_errors=True)
            for job in alone:
                await self._sbatch(job)
                self._submitting.discard(job.id)
        finally:
            self._submitting -= ids

    def _not_submitted(self, job_id: str, why: str) -> Change:
        """A job that will not reach Slurm: FAILED, or CANCELLED if a cancel came while it was being prepared."""
        if job_id in self._cancel_when_submitted:
            self._cancel_when_submitted.discard(job_id)
            return Change(job_id, JobState.CANCELLED, reason="cancelled before Slurm took it")
        return Change(job_id, JobState.FAILED, reason=why)

    def _prepare_array(self, name: str, folder, jobs: list[Job]) -> tuple[list[Job], list[Job], list[tuple]]:
        """Each job's folder, inputs and launcher, and the array's folder linking to them. Returns the jobs ready
        for the array, those that must go alone, and (job id, why) of those whose inputs could not be staged."""
        folder.mkdir(parents=True)
        ready, alone, failed = [], [], []
        for job in jobs:
            job_folder = self.folder(job.id)
            try:
                launcher = self._launcher(job, job_folder)
            except ValueError:
                alone.append(job)
                continue
            try:
                job_folder.mkdir(parents=True, exist_ok=True)
                self.stage_inputs(job, job_folder)
            except (OSError, AifedError) as exc:
                failed.append((job.id, exc))
                continue
            try:
                # From here on, a restart must look in Slurm (for this array, by its name) before resubmitting.
                (job_folder / "submitting").write_text(f"{name} {len(ready)}\n")
                if job.spec.script:
                    self._write_script(job, job_folder)
                (job_folder / LAUNCHER).write_text(launcher)
                (folder / str(len(ready))).symlink_to(job_folder.resolve())
            except OSError as exc:  # a disk full: this job goes alone, where the error is Slurm's or its own
                log.warning("job %s: cannot join job array %s: %s", job.id, name, exc)
                (job_folder / "submitting").unlink(missing_ok=True)
                alone.append(job)
                continue
            ready.append(job)
        if len(ready) < 2:
            shutil.rmtree(folder, ignore_errors=True)
            return [], alone + ready, failed
        return ready, alone, failed

    def _launcher(self, job: Job, folder) -> str:
        """The script an array task runs from the job's folder: the job's environment, then its command (or
        job.sh with its arguments). Every value is quoted literally (single quotes): the shell expands none."""
        spec, q = job.spec, shlex.quote
        # The name Slurm gives the job alone (sbatch --job-name) rather than the array's.
        env = {**self._job_env(job, folder), "SLURM_JOB_NAME": job.id}
        if not all(_SHELL_NAME.fullmatch(k) for k in env) or not _NOT_IN_LAUNCHER.isdisjoint(env):
            raise ValueError("an environment variable a launcher cannot set as sbatch would")
        command = ["./job.sh", *spec.script_args] if spec.script else list(spec.argv)
        return "\n".join([
            f"# written by aifed: the environment and command of job {job.id}, a task of a Slurm job array",
            "unset " + " ".join(ARRAY_ENV_VARS),
            *(f"export {k}={q(v)}" for k, v in env.items()),
            "exec " + " ".join(map(q, command)), ""])

    async def _submit_array(self, name: str, folder, tasks: list[tuple[int, Job]]) -> None:
        """One sbatch for the array's tasks: (task index, job), the index the one its folder links as."""
        jobs = [job for _, job in tasks]
        wrapper = folder / "task.sh"
        wrapper.write_text(
            "#!/bin/sh\n"
            f"# written by aifed: task N of Slurm array {name} runs the job whose folder {folder}/N links to\n"
            f'cd -P {shlex.quote(str(folder))}/"$SLURM_ARRAY_TASK_ID" || exit 1\n'
            f'echo "$SLURM_JOB_ID" > {TASK_ID_FILE}\n'
            f"exec /bin/sh ./{LAUNCHER}\n")
        env_file = folder / "task.env"
        env_file.write_bytes(f"PATH={self.runner.env.get('PATH', '/usr/bin:/bin')}".encode() + b"\0")
        argv = ["sbatch", "--parsable", "--ignore-pbs", f"--job-name={name}", f"--comment={TAG}{name}",
                f"--array={index_ranges([index for index, _ in tasks])}", *self._resources(jobs[0]),
                f"--chdir={folder}",
                f"--output={folder}/%a/stdout", f"--error={folder}/%a/stderr",
                f"--export-file={env_file}", "--export=AIFED_JOB_ID", str(wrapper)]
        # The jobs are in `_submitting` already (`_sbatch_array` holds them there until their sbatch answered).
        try:
            out = await self.runner.run(argv)
        except SchedulerUnavailable as exc:
            self._degraded(exc)
            self._uncertain |= {job.id for job in jobs}
            self._waiting.extend(jobs)
            log.info("%d job(s) wait at the hub: %s", len(jobs), exc.stderr)
            return
        except CommandError as exc:
            log.warning("Slurm refused job array %s (%s); submitting its %d jobs one by one", name, exc.stderr,
                        len(jobs))
            shutil.rmtree(folder, ignore_errors=True)
            for job in jobs:  # each keeps its place in `_submitting` until its own sbatch has answered
                await self._sbatch(job)
                self._submitting.discard(job.id)
            return
        array_id = out.stdout.strip().split(";")[0]
        log.info("%d job(s) went to Slurm as job array %s (%s)", len(jobs), array_id, name)
        self._adopt_all([(job, f"{array_id}_{index}") for index, job in tasks])

    def sweep_arrays(self, busy: set[str], min_age_s: float = 60.0) -> int:
        """Remove the folders of job arrays older than `min_age_s` none of whose jobs is `busy`; how many."""
        root = self.workdir / ARRAYS
        removed, now = 0, time.time()
        for folder in (root.iterdir() if root.is_dir() else ()):
            try:
                if folder.lstat().st_mtime > now - min_age_s:
                    continue
                linked = {os.path.basename(os.readlink(link)) for link in folder.iterdir() if link.is_symlink()}
                if linked & busy:
                    continue
                shutil.rmtree(folder)
                removed += 1
            except OSError as exc:
                log.warning("job array folder %s: %s", folder, exc)
        return removed

    def _busy(self) -> set[str]:
        """The jobs this backend still follows or will submit."""
        return set(self._tracked) | set(self._withdrawn) | set(self._unreleased) | self._submitting | {
            job.id for job in self._waiting}

    def _adopt(self, job: Job, slurm_id: str) -> None:
        self._adopt_all([(job, slurm_id)])

    def _adopt_all(self, submitted: list[tuple[Job, str]]) -> None:
        """Follow jobs Slurm took, and report their Slurm ids together (one journal commit for an array)."""
        for job, slurm_id in submitted:
            self._tracked[job.id] = _Tracked(job, slurm_id, JobState.QUEUED)
        self._report([Change(job.id, JobState.QUEUED, reason=f"Slurm job {slurm_id}", ref=slurm_id)
                      for job, slurm_id in submitted])
        for job, slurm_id in submitted:
            if job.id in self._cancel_when_submitted:
                self._cancel_when_submitted.discard(job.id)
                self._mark_cancelled(self._tracked[job.id])
                self._owe_scancel(job.id, slurm_id)

    def _owe_scancel(self, job_id: str, slurm_id: str) -> None:
        """A cancel the hub has answered, to deliver to Slurm now and, until `scancel` works (the controller may
        be down), again at every poll while the job is followed."""
        self._owed_scancels[job_id] = slurm_id
        task = asyncio.get_running_loop().create_task(self._pay_scancel(job_id), name=f"scancel {slurm_id}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _pay_scancel(self, job_id: str) -> None:
        slurm_id = self._owed_scancels.get(job_id)
        if slurm_id is None:
            return
        try:
            await self.runner.run(["scancel", slurm_id])
        except CommandError as exc:
            log.warning("scancel %s (job %s): %s; trying again at the next poll", slurm_id, job_id, exc.stderr)
            return
        if self._owed_scancels.get(job_id) == slurm_id:
            del self._owed_scancels[job_id]
        self._wake.set()

    async def _scancel(self, slurm_id: str) -> None:
        try:
            await self.runner.run(["scancel", slurm_id])
        except CommandError as exc:
            log.warning("scancel %s: %s", slurm_id, exc.stderr)
        self._wake.set()

    async def cancel(self, job_id: str) -> bool:
        for job in self._waiting:
            if job.id == job_id:
                if job_id in self._uncertain:
                    # Its sbatch went unanswered: Slurm may have it. The next poll looks, and cancels what it finds.
                    self._cancel_later(job_id)
                    return True
                self._waiting.remove(job)
                self.on_change(Change(job_id, JobState.CANCELLED, reason="cancelled before Slurm took it"))
                return True
        withdrawn = self._withdrawn.pop(job_id, None)
        if withdrawn is not None:  # held for a hand-off that will not happen now: gone from Slurm too
            await self._scancel(withdrawn.slurm_id)
            self._unreleased.pop(job_id, None)
            (self.folder(job_id) / WITHDRAWING).unlink(missing_ok=True)
            return False  # nothing will report it: the hub journals the cancel itself
        if job_id in self._submitting:  # its sbatch is running now: cancel it as soon as Slurm names it
            self._cancel_later(job_id)
            return True
        tracked = self._tracked.get(job_id)
        if tracked is None:
            return False
        self._mark_cancelled(tracked)
        await self.runner.run(["scancel", tracked.slurm_id])
        self._wake.set()
        return True

    def _cancel_later(self, job_id: str) -> None:
        """Cancel the job once Slurm names it (or never send it). The job's folder keeps the cancel: it was
        acknowledged, so a restart before Slurm named the job must not lose it."""
        self._cancel_when_submitted.add(job_id)
        folder = self.folder(job_id)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(folder / CANCEL_MARK, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_dir(folder)
        except OSError as exc:
            log.warning("job %s: keeping its cancel across a restart failed: %s", job_id, exc)

    def _mark_cancelled(self, t: _Tracked) -> None:
        """An array task cancelled while it waits with others leaves no trace in Slurm (no squeue entry, no
        record for sacct): the job's folder remembers that aifed cancelled it, across a restart too."""
        if "_" in t.slurm_id:
            (self.folder(t.job.id) / CANCELLED_MARK).write_bytes(b"")

    async def recover(self, job: Job, ref: str) -> Change | None:
        """Follow a job with a Slurm id; one whose sbatch may have run is looked up by its tag before it is
        sent again (at the first poll, when slurmctld answers); one that never reached sbatch is sent again."""
        folder = self.folder(job.id)
        cancelled = (folder / CANCEL_MARK).exists()  # while its sbatch's outcome was unknown, before a restart
        if ref:
            tracked = _Tracked(job, ref, job.state)
            if cancelled:  # Slurm named it, but the scancel may not have worked before the restart
                log.info("job %s: cancelling Slurm job %s, as asked before the restart", job.id, ref)
                self._tracked[job.id] = tracked
                self._mark_cancelled(tracked)
                self._owe_scancel(job.id, ref)
            elif (folder / WITHDRAWING).exists():  # held to be handed over, but never journaled MOVING
                log.info("job %s: releasing the hold a hand-off left on Slurm job %s", job.id, ref)
                await self._release(tracked)
            else:
                self._tracked[job.id] = tracked
            return None
        if (folder / "submitting").exists():
            self._uncertain.add(job.id)
        if cancelled:
            self._cancel_when_submitted.add(job.id)
        self._waiting.append(job)
        return None

    async def _find_by_tag(self, job_id: str) -> str | None:
        """The Slurm id of a job whose sbatch went unanswered: found by its name, or by the name of the job
        array it was sent in (then `<array id>_<task index>`, the task index kept in the job's folder)."""
        try:  # an array's sbatch leaves "<array name> <task index>" in the mark, a job's own sbatch nothing
            name, index = (self.folder(job_id) / "submitting").read_text().split()
        except (OSError, ValueError):
            name, index = job_id, ""
        entries = self._lookup_queue  # within a poll, one squeue for every lookup (an array's jobs are many)
        if entries is None:
            entries = await self._squeue()
            if self._looking_up:
                self._lookup_queue = entries
        for entry in entries:
            if entry.get("comment") == TAG + name or entry.get("name") == name:
                return f"{entry.get('array_job_id') or entry['job_id']}_{index}" if index else str(entry["job_id"])
        # jobcomp/filetxt ignores sacct's --name filter: match the name here.
        out = await self.runner.run(["sacct", "-c", "-n", "-P", f"--name={name}", "--format=JobID,JobName"],
                                    check=False)
        ids = [line.split("|")[0] for line in out.stdout.splitlines()
               if line.count("|") == 1 and line.split("|")[1] == name and line.split("|")[0].isdigit()]
        if not ids:
            return None
        # An array's first id is its own: its tasks that were split off got later ones.
        return f"{min(map(int, ids))}_{index}" if index else ids[-1]

    async def ping(self) -> bool:
        """`scontrol ping` answers at once even when slurmctld is down (other commands block for seconds)."""
        out = await self.runner.run(["scontrol", "ping"], check=False, timeout=10)
        if "is UP" in out.stdout:
            if not self._health.ok:
                log.info("Slurm is reachable again")
            self._health = Health()
            return True
        first = out.stdout.strip().splitlines()[0] if out.stdout.strip() else out.stderr.strip()
        self._degraded(SchedulerUnavailable(["scontrol", "ping"], 1, first or "no answer"))
        return False

    async def poll(self) -> None:
        """One round: send waiting jobs, then read states of the jobs in Slurm and report their changes."""
        if not await self.ping():
            return
        for t in list(self._unreleased.values()):
            if self._tracked.get(t.job.id) is t:
                await self._release(t, requeue=False)
            else:
                self._unreleased.pop(t.job.id, None)
        self._lookup_queue, self._looking_up = None, True
        try:
            for _ in range(len(self._waiting)):
                if not self._waiting or not self._health.ok:
                    break
                job = self._waiting.pop(0)  # one at a time: a cancel meanwhile still finds the others
                self._submitting.add(job.id)  # a cancel meanwhile is delivered once Slurm names it
                try:
                    await self._sbatch(job)
                except BaseException:
                    self._waiting.insert(0, job)
                    raise
                finally:
                    self._submitting.discard(job.id)
        finally:
            self._lookup_queue, self._looking_up = None, False
        for job_id in list(self._owed_scancels):
            if job_id in self._tracked:
                await self._pay_scancel(job_id)
            else:  # no longer followed (it ended): nothing left to cancel
                self._owed_scancels.pop(job_id, None)
        if not self._tracked:
            return
        tracked = list(self._tracked.items())  # judged against a squeue taken after this: none is missed
        entries = await self._squeue()
        ours = arrays_of(t.slurm_id for _, t in tracked)
        queue = keyed(entries, ours)
        # Arrays whose waiting tasks squeue listed in a way that cannot be read: their tasks are not judged now.
        unsure = {f"{e['array_job_id']}_" for e in entries if e.get("array_job_id") and e.get(
            "array_task_id") is None and e.get("array_task_string") and str(e["array_job_id"]) in ours
            and not entry_keys(e)}
        gone = []
        for job_id, t in tracked:
            if self._tracked.get(job_id) is not t:
                continue
            entry = queue.get(t.slurm_id)
            if entry is None:
                if not (unsure and t.slurm_id[:t.slurm_id.find("_") + 1] in unsure):
                    gone.append(t)
                continue
            if entry.get("array_task_id") is not None:
                t.task_id = str(entry["job_id"])
            state = map_state(str(entry.get("job_state", "")))
            if state.final:
                gone.append(t)  # sacct has the exit code as code:signal
            elif state != t.state:
                t.state = state
                self.on_change(Change(job_id, state, reason=str(entry.get("state_reason", "")).replace(
                    "None", "") if state is JobState.QUEUED else ""))
        if gone:
            await self._finish(gone, queue)

    def _own_id(self, t: _Tracked) -> str:
        """The Slurm job id sacct knows a job by: an array task's own id, from squeue or from the file the task
        wrote when it started ("" if it never started and squeue no longer shows it)."""
        if "_" not in t.slurm_id:
            return t.slurm_id
        if not t.task_id:
            try:
                text = (self.folder(t.job.id) / TASK_ID_FILE).read_text().strip()
                t.task_id = text if text.isdigit() else ""
            except OSError:
                pass
        return t.task_id

    async def _finish(self, gone: list[_Tracked], queue: dict) -> None:
        ids = {t.job.id: self._own_id(t) for t in gone}
        final = {}
        if known := sorted({i for i in ids.values() if i}):
            out = await self.runner.run(["sacct", "-c", "-n", "-P", "-j", ",".join(known),
                                         "--format=JobID,State,ExitCode"], check=False)
            for line in out.stdout.splitlines():
                parts = line.split("|")
                if len(parts) == 3:
                    final[parts[0]] = (parts[1], exit_from_sacct(parts[2]))
        for t in gone:
            if ids[t.job.id] in final:
                slurm_state, code = final[ids[t.job.id]]
            elif t.slurm_id in queue:  # final in squeue, not yet in the jobcomp file
                entry = queue[t.slurm_id]
                slurm_state, code = str(entry.get("job_state", "")), exit_from_status(int(entry.get("exit_code", 0)))
            elif not ids[t.job.id] and (self.folder(t.job.id) / CANCELLED_MARK).exists():
                slurm_state, code = "CANCELLED", None  # a pending array task aifed cancelled: gone without a trace
            else:
                del self._tracked[t.job.id]
                self.on_change(Change(t.job.id, JobState.LOST, reason=f"Slurm job {t.slurm_id} vanished: "
                                      "neither squeue nor sacct knows it"))
                continue
            state = map_state(slurm_state)
            if not state.final:
                continue
            del self._tracked[t.job.id]
            if t.state is JobState.QUEUED and state in (JobState.COMPLETED, JobState.FAILED, JobState.TIMEOUT):
                self.on_change(Change(t.job.id, JobState.RUNNING, reason="started and ended between two polls"))
            reason = {JobState.FAILED: f"Slurm: {slurm_state} (exit code {code})",
                      JobState.TIMEOUT: "killed by Slurm at its time limit",
                      JobState.CANCELLED: "cancelled in Slurm"}.get(state, "")
            self.on_change(Change(t.job.id, state, code, reason))

    async def _squeue(self) -> list[dict]:
        return (await self._json(["squeue", "--json"])).get("jobs", [])

    async def _json(self, argv: list[str]) -> dict:
        """A Slurm command's JSON answer; its `errors` (22.05 exits 0 with them) raise like a failure."""
        out = await self.runner.run(argv)
        data = orjson.loads(out.stdout)
        errors = [e.get("error", str(e)) if isinstance(e, dict) else str(e) for e in data.get("errors") or []]
        if errors:
            raise SchedulerUnavailable(argv, 0, "; ".join(errors))
        return data

    # -- capacity --------------------------------------------------------------------------------

    async def refresh_capacity(self) -> None:
        if not await self.ping():
            return
        nodes = (await self._json(["sinfo", "--json"])).get("nodes", [])
        self._slurm_partitions = {p for n in nodes for p in (n.get("partitions") or [])}
        jobs = await self._squeue()
        usage = {}
        for name in self.partitions:
            members = [n for n in nodes if name in (n.get("partitions") or [])]
            total = sum(gpu_count(n.get("gres", "")) for n in members)
            used = sum(gpu_count(n.get("gres_used", "")) for n in members)
            mine = [j for j in jobs if j.get("partition") == name]
            pending = [(j, task_count(j)) for j in mine
                       if j.get("job_state") == "PENDING"]
            usage[name] = PartitionUsage(
                name=name, gpus_total=total, gpus_free=max(0, total - used),
                running_jobs=sum(1 for j in mine if map_state(str(j.get("job_state", ""))) is JobState.RUNNING),
                pending_jobs=sum(n for _, n in pending),
                pending_gpu_seconds=float(sum(n * gpu_count(str(j.get("tres_per_node", ""))) * int(j.get(
                    "node_count", 1) or 1) * 60 * int(j.get("time_limit", 0) or 0) for j, n in pending)))
        self._usage = usage

    def usage(self) -> list[PartitionUsage]:
        return [self._usage.get(name) or PartitionUsage(name, p.gpus, p.gpus, 0, 0, 0.0)
                for name, p in self.partitions.items()]

    async def estimate_wait(self, partition: str, gpus: int, walltime_s: int) -> float:
        """`sbatch --test-only` for the shape, cached for the capacity interval."""
        key = (partition, gpus, walltime_s)
        cached = self._estimates.get(key)
        now = time.time()
        if cached and now - cached[0] < self.capacity_s:
            return _wait(cached[1], now)
        if not self._health.ok:
            return DEGRADED_WAIT_S
        argv = ["sbatch", "--test-only", f"--partition={partition}", f"--time={format_duration(walltime_s)}",
                "--nodes=1", "--ntasks=1", "--wrap=true", "--output=/dev/null"]
        if gpus:
            argv.append(f"--gres=gpu:{gpus}")
        try:
            out = await self.runner.run(argv)
        except SchedulerUnavailable as exc:
            self._degraded(exc)
            return DEGRADED_WAIT_S
        except CommandError as exc:
            if any(s in exc.stderr for s in NEVER_FITS):
                return float("inf")  # Slurm says this shape can never run here
            log.warning("sbatch --test-only failed: %s", exc.stderr)
            return DEGRADED_WAIT_S
        m = _START_AT.search(out.stderr + out.stdout)
        start = dt.datetime.fromisoformat(m.group(1)).timestamp() if m else now
        self._estimates[key] = (now, start)
        return _wait(start, now) if math.isfinite(start) else start
