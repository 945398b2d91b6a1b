"""The local backend: the embedded default, running each job as a process on the hub's machine.

Each partition is a pool of GPU slots, scheduled by the federation's queue model
(federation/queue.py): first come, first served with EASY backfilling, so a
later job may start first only if it delays no earlier one, and a large job is
never starved.
Each job runs in its own folder and process group, under a small `sh` wrapper
that records the exit code in a file, so a restarted hub can take back jobs
that kept running while it was down. Walltime is enforced (TIMEOUT): SIGTERM to
the process group, then SIGKILL after the grace period.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from federation.config import PartitionConfig
from federation.errors import AifedError
from federation.model import Job, JobState
from federation.queue import Entry, PartitionQueue
from federation.watch import stop_tasks, wait_event
from hub.backend import Backend, Change, OnChange, PartitionUsage

log = logging.getLogger(__name__)

# Runs the job's argv ("$@") without any shell interpretation of it, then records its exit code. The no-op
# trap keeps the wrapper alive through the SIGTERM sent to the job's process group, so the job gets its grace
# period and its real exit code is still recorded (a caught signal is reset to default in the job itself).
_WRAPPER = 'trap : TERM; "$@"; rc=$?; echo $rc > exit.tmp && mv exit.tmp exit; exit $rc'
_BASE_ENV = ("PATH", "LANG", "LC_ALL", "TZ")


@dataclass
class _Task:
    job: Job
    gpus: int
    cpus: int
    walltime_s: int
    submitted: float
    slots: list[int] = field(default_factory=list)
    pid: int = 0
    started: float = 0.0
    cancelled: bool = False
    timed_out: bool = False
    kill_at: float = 0.0          # when SIGKILL follows the SIGTERM already sent; 0: none sent
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    waiter: asyncio.Task | None = None


class LocalBackend(Backend):
    """Runs jobs as local processes with GPU-slot accounting and walltime enforcement."""

    def __init__(self, partitions: tuple[PartitionConfig, ...], on_change: OnChange, workdir: Path,
                 cpu_slots: int = 64, kill_grace_s: float = 10.0, poll_s: float = 0.2):
        super().__init__(partitions, on_change, workdir)
        self.cpu_slots = cpu_slots
        self.kill_grace_s = kill_grace_s
        self.poll_s = poll_s
        self._queues: dict[str, PartitionQueue] = {p.name: PartitionQueue(p.gpus) for p in partitions}
        self._waiting: dict[str, _Task] = {}  # queued jobs by id
        self._running: dict[str, _Task] = {}
        self._free: dict[str, set[int]] = {p.name: set(range(p.gpus)) for p in partitions}
        self._cpus_used = 0
        self._closed = False

    # -- the interface ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._schedule()

    async def submit(self, job: Job) -> None:
        self._enqueue(_Task(job, job.spec.gpus, job.spec.cpus, job.spec.walltime_s, time.time()))
        self._schedule()

    async def cancel(self, job_id: str) -> bool:
        task = self._waiting.pop(job_id, None)
        if task is not None:
            self._queues[task.job.partition].remove(job_id)
            self.on_change(Change(job_id, JobState.CANCELLED, reason="cancelled before it started"))
            self._schedule()
            return True
        task = self._running.get(job_id)
        if task is None:
            return False
        task.cancelled = True
        # Written before the signal: a hub restarted within the grace period still finishes the cancel, and one
        # restarted while the job was being started (its inputs copied) does not start it.
        folder = self.folder(job_id)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "cancelled").write_bytes(b"")
        self._terminate(task)
        return True

    async def recover(self, job: Job, ref: str) -> Change | None:
        folder = self.folder(job.id)
        launched = (folder / "launched").exists()
        part = self.partitions.get(job.partition)
        if not launched and (part is None or part.gpus < job.spec.gpus or job.spec.cpus > self.cpu_slots):
            return Change(job.id, JobState.FAILED, reason=f"partition {job.partition} no longer exists or no "
                          "longer fits the job (the hub's configuration changed while it was queued)")
        if not launched and (folder / "cancelled").exists():
            return Change(job.id, JobState.CANCELLED, reason="cancelled before it started")
        if not launched:
            # It never started: queue it again, in its original order (the journal lists oldest first).
            self._enqueue(_Task(job, job.spec.gpus, job.spec.cpus, job.spec.walltime_s, job.created_at))
            return None  # it starts in start(), once the running jobs have claimed their GPUs back
        exit_code = _read_exit(folder)
        cancelled = (folder / "cancelled").exists()
        if exit_code is not None:
            return self._final_change(job.id, exit_code, cancelled=cancelled, timed_out=False)
        info = orjson.loads(ref) if ref else {}
        pid = info.get("pid", 0)
        if pid and _is_our_process(pid, job.id):
            task = _Task(job, job.spec.gpus, job.spec.cpus, job.spec.walltime_s, job.created_at,
                         slots=list(info.get("slots", [])), pid=pid, started=info.get("started", time.time()))
            if part is None or any(slot >= part.gpus for slot in task.slots):
                task.slots = []  # its partition shrank: its GPUs are no longer counted here
            self._claim(job.partition, task, started=task.started)
            if cancelled:
                task.cancelled = True
                self._terminate(task)
            task.waiter = asyncio.create_task(self._follow(task, child=None), name=f"follow {job.id}")
            log.info("took back job %s (pid %d) after restart", job.id, pid)
            return None
        return Change(job.id, JobState.LOST,
                      reason="the job's process ended while the hub was down and left no exit code")

    def usage(self) -> list[PartitionUsage]:
        out = []
        for name, part in self.partitions.items():
            queue = self._queues[name]
            out.append(PartitionUsage(
                name=name, gpus_total=part.gpus, gpus_free=len(self._free[name]), running_jobs=len(queue.running),
                pending_jobs=len(queue), pending_gpu_seconds=max(0.0, queue.pending_gpu_s)))
        return out

    async def estimate_wait(self, partition: str, gpus: int, walltime_s: int) -> float:
        """When a job of this shape would start behind the queue, from the queue model (walltimes as runtimes)."""
        return self._queues[partition].wait(gpus, walltime_s, time.time())

    async def waiting(self) -> list[tuple[str, float]]:
        """Each queued job's expected wait, from the queue model (the order it would start in, walltimes as
        runtimes)."""
        now = time.time()
        out = []
        for queue in self._queues.values():
            out += [(key, max(0.0, start - now)) for key, start in queue.snapshot(now).starts().items()]
        return out

    async def withdraw(self, job_id: str) -> bool:
        task = self._waiting.pop(job_id, None)
        if task is None:
            return False
        self._queues[task.job.partition].remove(job_id)
        self._schedule()
        return True

    async def close(self) -> None:
        """Stop following jobs; running processes keep going and are taken back by the next start."""
        self._closed = True
        waiters = [t.waiter for t in self._running.values() if t.waiter]
        for w in waiters:
            w.cancel()
        await stop_tasks(waiters)
        self.close_files()

    # -- scheduling ------------------------------------------------------------------------------

    def _enqueue(self, task: _Task) -> None:
        self._waiting[task.job.id] = task
        self._queues[task.job.partition].add(task.job.id, task.gpus, task.walltime_s, task.submitted)

    def _schedule(self) -> None:
        if self._closed:
            return
        now = time.time()
        cpus_left = self.cpu_slots - self._cpus_used

        def can_start(entry: Entry) -> bool:
            nonlocal cpus_left
            need = self._waiting[entry.key].cpus
            if need > cpus_left:
                return False
            cpus_left -= need
            return True

        for name, queue in self._queues.items():
            for entry in queue.schedule(now, can_start):
                task = self._waiting.pop(entry.key)
                task.slots = sorted(self._free[name])[:task.gpus]
                self._claim(name, task)
                task.waiter = asyncio.create_task(self._run(task), name=f"run {task.job.id}")

    def _claim(self, partition: str, task: _Task, started: float | None = None) -> None:
        """Count a job's GPUs and CPUs as used: one the queue started (`started` None), or one taken back."""
        if partition in self._free:
            self._free[partition] -= set(task.slots)
            if started is not None:
                self._queues[partition].claim(Entry(task.job.id, len(task.slots), task.walltime_s, task.submitted),
                                              started)
        self._cpus_used += task.cpus
        self._running[task.job.id] = task

    def _release(self, task: _Task) -> None:
        if self._running.pop(task.job.id, None) is task:
            if task.job.partition in self._free:
                self._free[task.job.partition] |= set(task.slots)
                self._queues[task.job.partition].finish(task.job.id)
            self._cpus_used -= task.cpus
        self._schedule()

    # -- running ---------------------------------------------------------------------------------

    async def _run(self, task: _Task) -> None:
        job, spec = task.job, task.job.spec
        folder = self.folder(job.id)
        if task.cancelled:  # cancelled before its start began
            self._not_started(task)
            return
        try:
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            if spec.inputs:  # copied in a worker thread: a large input would stall the hub's event loop
                await self.in_file_thread(self.stage_inputs, job, folder)
                if task.cancelled:  # cancelled while its inputs were copied
                    self._not_started(task)
                    return
            if spec.script:
                script = folder / "script"
                script.write_text(spec.script)
                script.chmod(0o700)
                argv = [str(script) if spec.script.startswith("#!") else "/bin/sh", *(
                    [] if spec.script.startswith("#!") else [str(script)]), *spec.script_args]
            else:
                argv = list(spec.argv)
            env = {k: os.environ[k] for k in _BASE_ENV if k in os.environ}
            env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
            env.update(spec.env)
            env.update(spec.array_env())
            env.update({
                "HOME": str(folder), "TMPDIR": str(folder), "AIFED_JOB_ID": job.id, "AIFED_SITE": job.site,
                "AIFED_PARTITION": job.partition, "AIFED_GPUS": str(task.gpus),
                "CUDA_VISIBLE_DEVICES": ",".join(map(str, task.slots)),
            })
            (folder / "launched").write_bytes(b"")
            # subprocess.Popen (vfork/exec: about 1 ms), not the event loop's subprocess API: forking the daemon
            # from uvloop costs tens of ms, and an asyncio subprocess transport kills its child when it is
            # closed, so a job would die with a stopping hub instead of being taken back by the next one.
            with open(folder / "stdout", "wb") as out, open(folder / "stderr", "wb") as err:
                child = subprocess.Popen(
                    ["/bin/sh", "-c", _WRAPPER, "aifed-job", *argv], cwd=folder, env=env,
                    stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True)
        except (OSError, AifedError) as exc:
            if task.cancelled:  # cancelled while its inputs were copied: that is what it ends as
                self._not_started(task)
                return
            self._release(task)
            self.on_change(Change(job.id, JobState.FAILED, reason=f"could not start the job: {exc}"))
            return
        task.pid, task.started = child.pid, time.time()
        if task.cancelled:  # cancelled while it was being started: it gets its SIGTERM now
            self._signal(task, signal.SIGTERM)
        ref = orjson.dumps({"pid": task.pid, "slots": task.slots, "started": task.started}).decode()
        self.on_change(Change(job.id, JobState.RUNNING, ref=ref))
        await self._follow(task, child)

    def _not_started(self, task: _Task) -> None:
        self._release(task)
        self.on_change(Change(task.job.id, JobState.CANCELLED, reason="cancelled before it started"))

    async def _follow(self, task: _Task, child: subprocess.Popen | None) -> None:
        """Wait for the job to end (as our child, or by polling a taken-back pid), enforcing walltime.

        The job has ended when its wrapper has exited and no process of its group is left: stragglers get the
        rest of their grace period after a SIGTERM, and SIGKILL after it (or at once after a normal end)."""
        try:
            while not await self._wrapper_exited(task, child, self._next_deadline(task) - time.time()):
                now = time.time()
                if not task.kill_at and now >= task.started + task.walltime_s:
                    task.timed_out = True
                    self._terminate(task)
                elif task.kill_at and now >= task.kill_at:
                    self._signal(task, signal.SIGKILL)
            while task.kill_at and time.time() < task.kill_at and _group_alive(task.pid):
                await asyncio.sleep(min(self.poll_s, task.kill_at - time.time()))
            self._signal(task, signal.SIGKILL)
        except asyncio.CancelledError:
            return  # the hub is stopping: the job runs on and is taken back at the next start
        code = _read_exit(self.folder(task.job.id))
        if code is None and child is not None:
            code = child.returncode if child.returncode >= 0 else 128 - child.returncode
        if code is None and (task.timed_out or task.cancelled):
            code = 128 + signal.SIGKILL
        self._release(task)
        if code is None:
            self.on_change(Change(task.job.id, JobState.LOST, reason="the job ended without leaving an exit code"))
            return
        self.on_change(self._final_change(task.job.id, code, task.cancelled, task.timed_out))

    def _next_deadline(self, task: _Task) -> float:
        return task.kill_at if task.kill_at else task.started + task.walltime_s

    async def _wrapper_exited(self, task: _Task, child: subprocess.Popen | None, timeout: float) -> bool:
        """Wait up to `timeout` (polling; woken early by a cancel) for the job's wrapper to exit."""
        task.wake.clear()
        if self._exited(task, child):
            return True
        await wait_event(task.wake, max(0.0, min(timeout, self.poll_s)))
        return self._exited(task, child)

    @staticmethod
    def _exited(task: _Task, child: subprocess.Popen | None) -> bool:
        if child is not None:
            return child.poll() is not None  # also reaps it
        return not _is_our_process(task.pid, task.job.id)

    def _terminate(self, task: _Task) -> None:
        """SIGTERM to the job's process group now (or as soon as it has one); SIGKILL after the grace period."""
        if not task.kill_at:
            task.kill_at = time.time() + self.kill_grace_s
            self._signal(task, signal.SIGTERM)
            task.wake.set()

    def _final_change(self, job_id: str, code: int, cancelled: bool, timed_out: bool) -> Change:
        if timed_out:
            return Change(job_id, JobState.TIMEOUT, code, "killed at its walltime")
        if cancelled:
            return Change(job_id, JobState.CANCELLED, code, "cancelled while running")
        if code == 0:
            return Change(job_id, JobState.COMPLETED, 0)
        if code > 128:
            try:
                name = signal.Signals(code - 128).name
            except ValueError:
                name = f"signal {code - 128}"
            return Change(job_id, JobState.FAILED, code, f"killed by {name}")
        return Change(job_id, JobState.FAILED, code, f"exited with code {code}")

    def _signal(self, task: _Task, sig: signal.Signals) -> None:
        if task.pid and self._running.get(task.job.id) is task:
            try:
                os.killpg(task.pid, sig)
            except ProcessLookupError:
                pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _read_exit(folder: Path) -> int | None:
    try:
        return int((folder / "exit").read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _is_our_process(pid: int, job_id: str) -> bool:
    """True if pid is alive (not a zombie) and is the wrapper of this job (guards against pid reuse)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
        return f"AIFED_JOB_ID={job_id}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
        return False
