"""Benchmarks: `aifed bench slurm` (is aifed ever the bottleneck in front of Slurm?) and `aifed bench forward`
(how many jobs per second an antenna and a hub acknowledge and forward durably).

`aifed bench slurm`:
Starts a private Slurm (hub/slurmlab.py), then submits N trivial jobs (a) directly, `sbatch` in a loop, and
(b) through an antenna and a hub (separate processes, mutual TLS, durable journals, the Slurm backend) into the
same Slurm, with 16 submissions in flight. Phase (b) ends when all N jobs are in Slurm (`squeue`, by their
`aifed:` tag). Prints both throughputs and their ratio; with --json, one JSON object on the last line.

`aifed bench forward`: an antenna and a hub whose backend holds jobs without running them (`hold`), driven by
concurrent clients for a given time, (a) one job per SubmitJob call and (b) in SubmitJobs batches. Prints
jobs per second acknowledged (by the antenna) and forwarded (journaled by the hub), per-call latency, the
backlog between the two, and each daemon's CPU and peak memory. Two baselines are measured first, in the same
command: a gRPC server doing nothing (federation/bench_floor.py) and the bare pipeline, which forwards the same
way with none of aifed's own work (federation/bench_bare.py); every run is printed as a share of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

from certs import pki
from federation.identity import Role
from federation.net import free_port

FEDERATION = "bench.test"


@contextlib.contextmanager
def workdir(keep: Path | None, prefix: str):
    """The folder a benchmark works in: `keep` (left in place), or a temporary one removed afterwards."""
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield root
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _squeue_tagged(env: dict) -> int:
    """Jobs aifed put in Slurm (the tasks of its job arrays each counted)."""
    from hub.slurm import entry_keys
    out = subprocess.run(["squeue", "--json"], env=env, capture_output=True, text=True, timeout=60)
    return sum(len(entry_keys(j)) for j in orjson.loads(out.stdout).get("jobs", [])
               if str(j.get("comment", "")).startswith("aifed:"))


def _wait_drained(env: dict, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["squeue", "-h", "-t", "PENDING,RUNNING,COMPLETING", "-o", "%i"], env=env,
                             capture_output=True, text=True, timeout=60)
        if not out.stdout.strip():
            return
        time.sleep(0.5)


def run_direct(env: dict, jobs: int, folder: Path) -> float:
    started = time.perf_counter()
    for i in range(jobs):
        subprocess.run(["sbatch", "--parsable", "--partition=debug", "--time=1", f"--job-name=direct-{i}",
                        "--output=/dev/null", "--wrap=true"], env=env, check=True, capture_output=True)
    return jobs / (time.perf_counter() - started)


class BenchFederation:
    """Hubs (`hub1`, `hub2`...) and an antenna as separate processes (mutual TLS, durable journals), for
    benchmarks and drills. Processes are named by kind: "hub1", "antenna"..."""

    def __init__(self, root: Path, backend: str, slurm_conf: str = "", partition: str = "debug", hubs: int = 1,
                 cpu_slots: int = 16, array_size: int = 0):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        p = self.pki = self.root / "pki"
        pki.init_ca(p, FEDERATION)
        antenna = pki.issue(p, Role.ANTENNA, "antenna1")
        self.user = pki.issue(p, Role.USER, "antenna1", "bench")
        self.hubs = [f"hub{i + 1}" for i in range(hubs)]
        ports = {site: free_port() for site in self.hubs}
        self.antenna_port = free_port()
        self.hub_port = ports["hub1"]
        tls = lambda i: f'[tls]\nca = "{p / "ca.pem"}"\ncert = "{i.cert}"\nkey = "{i.key}"\n'  # noqa: E731
        slurm = f'slurm_conf = "{slurm_conf}"\npoll_interval = "2s"\ncapacity_interval = "10s"\n' if slurm_conf \
            else ""
        if array_size:
            slurm += f"array_size = {array_size}\n"
        # Benchmarks measure what aifed can do: no submit limits (production keeps the defaults, see
        # docs/configuration.md).
        unlimited = "[limits]\nsubmit_rate = 0\n\n"
        self.configs: dict[str, Path] = {}
        for site in self.hubs:
            self.configs[site] = _write(self.root / f"{site}.toml", f'''[hub]
site = "{site}"
federation = "{FEDERATION}"
listen = "127.0.0.1:{ports[site]}"
state_dir = "{self.root / site}"

[backend]
type = "{backend}"
cpu_slots = {cpu_slots}
{slurm}
[[partitions]]
name = "{partition}"
max_walltime = "1:00:00"

{unlimited}{tls(pki.issue(p, Role.HUB, site))}''')
        hub_tables = "".join(f'[[hubs]]\nsite = "{site}"\nendpoint = "127.0.0.1:{ports[site]}"\n\n'
                             for site in self.hubs)
        self.configs["antenna"] = _write(self.root / "antenna.toml", f'''[antenna]
site = "antenna1"
federation = "{FEDERATION}"
listen = "127.0.0.1:{self.antenna_port}"
state_dir = "{self.root / 'antenna'}"

{hub_tables}{unlimited}{tls(antenna)}''')
        self.procs: dict[str, subprocess.Popen] = {}

    def journal(self, name: str) -> Path:
        return self.root / name / ("antenna.sqlite" if name == "antenna" else "hub.sqlite")

    def start(self, name: str) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        kind = "antenna" if name == "antenna" else "hub"
        proc = subprocess.Popen([sys.executable, "-m", "federation.cli", kind, "--config", str(self.configs[name]),
                                 "--log-level", os.environ.get("AIFED_BENCH_LOG_LEVEL", "warning")],
                                stdout=open(self.root / f"{name}.log", "ab"), stderr=subprocess.STDOUT, env=env)
        self.procs[name] = proc
        return proc

    def start_all(self) -> None:
        for name in [*self.hubs, "antenna"]:
            self.start(name)

    def client(self):
        from federation.client import AntennaClient
        from federation.config import ClientConfig
        from federation.tls import TlsFiles
        return AntennaClient(ClientConfig(f"127.0.0.1:{self.antenna_port}",
                                          TlsFiles(self.pki / "ca.pem", self.user.cert, self.user.key)))

    async def wait_ready(self, client, timeout: float = 60) -> None:
        """Until the antenna answers and has heard from every hub."""
        deadline = time.monotonic() + timeout
        while not ((sites := await _sites(client)) and all(s.reachable for s in sites)):
            if time.monotonic() > deadline or any(pr.poll() is not None for pr in self.procs.values()):
                raise RuntimeError(f"the federation did not come up; see {self.root}/*.log")
            await asyncio.sleep(0.1)

    def stop(self, name: str | None = None, sig: int = signal.SIGTERM) -> None:
        for n in [name] if name else list(self.procs):
            proc = self.procs.pop(n, None)
            if proc is None:
                continue
            proc.send_signal(sig)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def query(self, name: str, sql: str, args=()) -> list:
        """Rows from a daemon's journal, read as another process sees its committed state."""
        import sqlite3
        try:
            with sqlite3.connect(f"file:{self.journal(name)}?mode=ro", uri=True, timeout=10) as db:
                return db.execute(sql, args).fetchall()
        except sqlite3.OperationalError:
            return []

    def hub_count(self) -> int:
        return sum(row[0] for site in self.hubs for row in self.query(site, "SELECT count(*) FROM jobs"))


def bench_spec():
    """The job every forwarding benchmark submits: `true`, one CPU, a minute of walltime."""
    from federation.model import JobSpec
    return JobSpec(argv=("true",), walltime_s=60)


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_mb(pid: int, field: str = "VmHWM") -> float:
    """A process's memory from /proc: its peak resident set (VmHWM) or its resident set now (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return 0.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


async def run_federation(env: dict, jobs: int, root: Path, in_flight: int = 16, array_size: int = 0) -> dict:
    from federation.model import JobSpec

    fed = BenchFederation(root, "slurm", slurm_conf=env["SLURM_CONF"], array_size=array_size)
    fed.start_all()
    try:
        client = fed.client()
        await fed.wait_ready(client)
        spec = JobSpec(argv=("true",), walltime_s=60, partition="debug")
        latencies: list[float] = []
        queue = iter(range(jobs))

        async def submitter():
            for _ in queue:
                t = time.perf_counter()
                await client.submit(spec)
                latencies.append(time.perf_counter() - t)

        before = await asyncio.to_thread(_squeue_tagged, env)  # an earlier phase's, ended but still shown
        started = time.perf_counter()
        await asyncio.gather(*(submitter() for _ in range(in_flight)))
        acknowledged = time.perf_counter() - started
        while await asyncio.to_thread(_squeue_tagged, env) < before + jobs:
            if time.perf_counter() - started > 600:
                raise RuntimeError("not every job reached Slurm within 600 s")
            await asyncio.sleep(0.2)
        in_slurm = time.perf_counter() - started
        await client.close()
        return {"federation_jobs_per_s": jobs / in_slurm, "acknowledged_per_s": jobs / acknowledged,
                "submit_p50_ms": 1000 * percentile(latencies, 0.5), "submit_p99_ms": 1000 * percentile(latencies, 0.99)}
    finally:
        fed.stop()


async def _sites(client):
    try:
        return await client.sites()
    except Exception:  # noqa: BLE001 - not up yet
        return []


# -- aifed bench forward -------------------------------------------------------------------------

async def forward_run(root: Path, seconds: float, clients: int, batch: int, array: bool = False) -> dict:
    """One run: `clients` concurrent submitters for `seconds`, `batch` jobs per call (1: SubmitJob). With
    `array`, each call asks for one job array of `batch` tasks (`aifed submit --array 0-N`) rather than
    `batch` separate jobs."""
    from federation import convert
    from federation.model import JobState
    from federation.pb import antenna_pb2

    fed = BenchFederation(root, "hold")
    hub, antenna = fed.start("hub1"), fed.start("antenna")
    try:
        client = fed.client()
        await fed.wait_ready(client)
        spec = bench_spec()
        latencies: list[float] = []
        acked = 0
        pids = {"hub": hub.pid, "antenna": antenna.pid, "client": os.getpid()}
        cpu0 = {k: cpu_seconds(pid) for k, pid in pids.items()}
        started = time.perf_counter()
        stop_at = started + seconds

        # Requests are built once: the clients share the machine with the daemons, and should cost it little.
        one = antenna_pb2.SubmitJobRequest(spec=convert.spec_to_pb(spec))
        many = antenna_pb2.SubmitJobsRequest(jobs=[antenna_pb2.SubmitJobRequest(spec=one.spec, array=f"0-{batch - 1}")]
                                             if array else [one] * batch)

        async def submitter():
            nonlocal acked
            while time.perf_counter() < stop_at:
                t = time.perf_counter()
                if batch == 1:
                    await client.stub.SubmitJob(one, timeout=30)
                else:
                    response = await client.stub.SubmitJobs(many, timeout=60)
                    if any(r.HasField("error") for r in response.results):
                        raise RuntimeError(f"a job was refused: {response}")
                latencies.append(time.perf_counter() - t)
                acked += batch

        backlog: list[tuple[float, int]] = []

        async def sampler():
            while time.perf_counter() < stop_at:
                await asyncio.sleep(1.0)
                backlog.append((time.perf_counter() - started, acked - await asyncio.to_thread(fed.hub_count)))

        await asyncio.gather(*(submitter() for _ in range(clients)), sampler())
        window = time.perf_counter() - started
        forwarded_in_window = await asyncio.to_thread(fed.hub_count)
        cpu = {k: cpu_seconds(pid) - cpu0[k] for k, pid in pids.items()}
        while (count := await asyncio.to_thread(fed.hub_count)) < acked:  # drain what was acknowledged
            if failed := fed.query("antenna", "SELECT record FROM jobs WHERE state = ? LIMIT 1",
                                   (int(JobState.FAILED),)):
                raise RuntimeError(f"a job failed: {orjson.loads(failed[0][0])['reason']}")
            if time.perf_counter() - started > seconds + 300:
                raise RuntimeError(f"only {count} of {acked} acknowledged jobs reached the hub")
            await asyncio.sleep(0.2)
        drained = time.perf_counter() - started
        await client.close()
        half = [b for t, b in backlog if t > seconds / 2]
        return {
            "jobs_per_s": round(acked / window, 1),
            "forwarded_per_s": round(forwarded_in_window / window, 1),
            "p50_ms": round(1000 * percentile(latencies, 0.5), 2),
            "p99_ms": round(1000 * percentile(latencies, 0.99), 2),
            "acknowledged": acked, "drain_s": round(drained - window, 2),
            "backlog_max": max((b for _, b in backlog), default=0),
            "backlog_end": backlog[-1][1] if backlog else 0,
            "backlog_second_half_max": max(half, default=0),
            "jobs_per_call": batch, "clients": clients,
            "hub_cpu_pct": round(100 * cpu["hub"] / window, 1),
            "antenna_cpu_pct": round(100 * cpu["antenna"] / window, 1),
            "client_cpu_pct": round(100 * cpu["client"] / window, 1),
            "hub_peak_rss_mb": round(memory_mb(hub.pid), 1),
            "antenna_peak_rss_mb": round(memory_mb(antenna.pid), 1),
        }
    finally:
        fed.stop()


def run_forward_bench(seconds: float, clients: int, batch: int, as_json: bool, keep: Path | None = None) -> int:
    with workdir(keep, "aifed-bench-forward-") as root:
        result = {}
        # The baseline, measured first in the same command: a gRPC server over mTLS with a handler that does
        # nothing (federation.bench_floor). Unbatched jobs per second are compared with its calls per second.
        from federation.bench_floor import measure
        floor_pki = root / "floor-pki"
        pki.init_ca(floor_pki, FEDERATION)
        print(f"gRPC floor: {clients} clients, a handler that does nothing, {min(seconds, 10):g} s...", file=sys.stderr)
        floor = result["grpc_floor"] = asyncio.run(measure(
            floor_pki, pki.issue(floor_pki, Role.ANTENNA, "floor"), pki.issue(floor_pki, Role.USER, "floor", "bench"),
            min(seconds, 10), clients))
        print(f"gRPC floor: {floor['calls_per_s']:8.1f} calls/s, server CPU {floor['server_cpu_us_per_call']} us "
              f"per call ({floor['server_cpu_pct']:.0f}%)")
        # The second baseline: the bare pipeline (federation.bench_bare), forwarding with none of aifed's own work,
        # unbatched and batched with the same clients. Every run's jobs per second are compared with it.
        from federation.bench_bare import measure as measure_bare
        hub_id, antenna_id = pki.issue(floor_pki, Role.HUB, "hub1"), pki.issue(floor_pki, Role.ANTENNA, "antenna1")
        user_id = pki.issue(floor_pki, Role.USER, "antenna1", "bench")
        bare = result["bare_pipeline"] = {}
        for name, per_call, n in (("unbatched", 1, clients), ("batched", batch, max(2, clients // 4))):
            print(f"bare pipeline, {name}: {n} clients, {per_call} job(s) per call, {min(seconds, 10):g} s...",
                  file=sys.stderr)
            b = bare[name] = asyncio.run(measure_bare(root / f"bare-{name}", floor_pki, hub_id, antenna_id, user_id,
                                                      min(seconds, 10), n, per_call))
            print(f"bare pipeline, {name:>9}: acknowledged {b['jobs_per_s']:8.1f} jobs/s, forwarded "
                  f"{b['forwarded_per_s']:8.1f} jobs/s; CPU per job antenna {b['antenna_cpu_us_per_job']} us hub "
                  f"{b['hub_cpu_us_per_job']} us")
        runs = (("unbatched", 1, clients, False), ("batched", batch, max(2, clients // 4), False),
                ("arrays", batch, max(2, clients // 4), True))
        for name, per_call, n, array in runs:
            what = f"an array of {per_call} tasks" if array else f"{per_call} job(s)"
            print(f"{name}: {n} clients, {what} per call, {seconds:g} s...", file=sys.stderr)
            r = result[name] = asyncio.run(forward_run(root / name, seconds, n, per_call, array))
            # CPU per job: the antenna's for each job it acknowledged, the hub's for each job it journaled.
            r["antenna_cpu_us_per_job"] = round(r["antenna_cpu_pct"] * 1e4 / max(r["jobs_per_s"], 1e-9))
            r["hub_cpu_us_per_job"] = round(r["hub_cpu_pct"] * 1e4 / max(r["forwarded_per_s"], 1e-9))
            r["of_bare_pipeline"] = round(r["jobs_per_s"] / bare["unbatched" if per_call == 1 else "batched"]
                                          ["jobs_per_s"], 3)
            floor_note = f"; {r['of_bare_pipeline']:.2f} of the bare pipeline's jobs/s"
            if per_call == 1:  # one call per job: the floor bounds it
                r["of_grpc_floor"] = round(r["jobs_per_s"] / floor["calls_per_s"], 3)
                floor_note += f", {r['of_grpc_floor']:.2f} of the gRPC floor's calls/s"
            print(f"{name:>9}: acknowledged {r['jobs_per_s']:8.1f} jobs/s, forwarded {r['forwarded_per_s']:8.1f} "
                  f"jobs/s, submit p50 {r['p50_ms']:.1f} ms p99 {r['p99_ms']:.1f} ms per call; backlog max "
                  f"{r['backlog_max']} end {r['backlog_end']}, drained in {r['drain_s']:.1f} s; CPU hub "
                  f"{r['hub_cpu_pct']:.0f}% antenna {r['antenna_cpu_pct']:.0f}% clients {r['client_cpu_pct']:.0f}%; "
                  f"peak RSS hub "
                  f"{r['hub_peak_rss_mb']:.0f} MB antenna {r['antenna_peak_rss_mb']:.0f} MB; CPU per job antenna "
                  f"{r['antenna_cpu_us_per_job']} us hub {r['hub_cpu_us_per_job']} us{floor_note}")
        if as_json:
            print(orjson.dumps(result).decode())
        return 0


def run_slurm_bench(jobs: int, as_json: bool, keep: Path | None = None, single: bool = False) -> int:
    from hub.slurmlab import SlurmLab, SlurmLabError

    with workdir(keep, "aifed-bench-") as root:
        lab = SlurmLab(root / "slurm", partitions={"debug": 0}, gpus=1, cpus=64)
        try:
            lab.start()
        except SlurmLabError as exc:
            print(f"aifed: {exc}", file=sys.stderr)
            return 4
        try:
            return _slurm_phases(lab.env, jobs, as_json, root, single)
        finally:
            lab.stop()


def _slurm_phases(env: dict, jobs: int, as_json: bool, root: Path, single: bool = False) -> int:
    print(f"(a) {jobs} jobs with sbatch in a loop...", file=sys.stderr)
    direct = run_direct(env, jobs, root)
    _wait_drained(env)
    print(f"(b) {jobs} jobs through antenna and hub...", file=sys.stderr)
    fed = asyncio.run(run_federation(env, jobs, root))
    result = {"jobs": jobs, "direct_jobs_per_s": round(direct, 1),
              "federation_jobs_per_s": round(fed["federation_jobs_per_s"], 1),
              "ratio": round(fed["federation_jobs_per_s"] / direct, 3),
              "acknowledged_per_s": round(fed["acknowledged_per_s"], 1),
              "submit_p50_ms": round(fed["submit_p50_ms"], 2), "submit_p99_ms": round(fed["submit_p99_ms"], 2)}
    print(f"direct sbatch:        {result['direct_jobs_per_s']:8.1f} jobs/s")
    print(f"through the federation:{result['federation_jobs_per_s']:7.1f} jobs/s into Slurm "
          f"(acknowledged {result['acknowledged_per_s']:.1f}/s, submit p50 {result['submit_p50_ms']:.1f} ms, "
          f"p99 {result['submit_p99_ms']:.1f} ms)")
    print(f"ratio federation/direct: {result['ratio']:.3f}")
    if single:
        _wait_drained(env)
        print(f"(c) {jobs} jobs through antenna and hub, one sbatch per job...", file=sys.stderr)
        one = asyncio.run(run_federation(env, jobs, root / "single", array_size=1))
        result["single_jobs_per_s"] = round(one["federation_jobs_per_s"], 1)
        result["single_ratio"] = round(one["federation_jobs_per_s"] / direct, 3)
        print(f"one sbatch per job:   {result['single_jobs_per_s']:8.1f} jobs/s into Slurm "
              f"(ratio {result['single_ratio']:.3f})")
    if as_json:
        print(orjson.dumps(result).decode())
    return 0


# -- aifed bench scale ---------------------------------------------------------------------------

def fill_hub_journal(path: Path, finished: int, active: int, antenna: str = "antenna1") -> list[str]:
    """A hub journal with `finished` ended and `active` queued jobs of `antenna`'s users; returns their ids."""
    from federation.journal import Journal
    from federation.model import Job, JobSpec, JobState

    journal = Journal(path)
    owner = f"spiffe://{FEDERATION}/user/{antenna}/bench"
    spec = JobSpec(argv=("python", "train.py", "--epochs", "3"), walltime_s=3600, partition="debug")
    now = time.time()
    ids = []
    chunk = 20_000
    for start in range(0, finished + active, chunk):
        jobs = []
        for i in range(start, min(start + chunk, finished + active)):
            job_id = f"{antenna}-{i:012x}"
            job = Job(id=job_id, spec=spec, state=JobState.PENDING, owner=owner, antenna=antenna, site="hub1",
                      partition="debug", created_at=now - 86400, updated_at=now - 86400)
            job = job.moved(JobState.FORWARDED, "accepted", at=now - 86400).moved(JobState.QUEUED, "queued",
                                                                                 at=now - 86400)
            if i < finished:
                job = job.moved(JobState.RUNNING, "", at=now - 80000).moved(JobState.COMPLETED, "", at=now - 79000,
                                                                            exit_code=0)
            jobs.append(job)
            ids.append(job_id)
        journal.write(lambda tx, jobs=jobs: [tx.insert(j, f"{antenna}/{j.id}") for j in jobs])
    journal.close()
    return ids


async def scale_run(root: Path, finished: int, active: int, queries: int) -> dict:
    from federation.identity import Role as R
    from federation.pb import hub_pb2, hub_pb2_grpc, jobs_pb2
    from federation.rpc import secure_channel
    from federation.tls import TlsFiles

    fed = BenchFederation(root, "hold")
    started = time.perf_counter()
    ids = await asyncio.to_thread(fill_hub_journal, fed.journal("hub1"), finished, active)
    filled = time.perf_counter() - started
    size_mb = fed.journal("hub1").stat().st_size / 2**20
    started = time.perf_counter()
    hub = fed.start("hub1")
    cert, key = pki.cert_paths(fed.pki, pki.identity_for(FEDERATION, R.ANTENNA, "antenna1"))
    latencies = []
    try:
        async with secure_channel(f"127.0.0.1:{fed.hub_port}", TlsFiles(fed.pki / "ca.pem", cert, key)) as channel:
            stub = hub_pb2_grpc.HubStub(channel)
            await stub.GetAdvert(hub_pb2.AdvertRequest(), wait_for_ready=True, timeout=120)
            ready = time.perf_counter() - started
            rng = random.Random(1)
            for _ in range(queries):
                job_id = ids[rng.randrange(len(ids))]
                t = time.perf_counter()
                job = await stub.GetJob(jobs_pb2.JobRef(job_id=job_id), timeout=10)
                latencies.append(time.perf_counter() - t)
                assert job.id == job_id
        rss, peak = memory_mb(hub.pid, "VmRSS"), memory_mb(hub.pid)
    finally:
        fed.stop()
    # The baseline, in the same command: as many calls, one at a time, to a gRPC server whose handler does nothing
    # (federation.bench_floor). What a status query takes beyond it is the hub's; the rest is the machine's now.
    from federation.bench_floor import round_trips
    floor_pki = root / "floor-pki"
    pki.init_ca(floor_pki, FEDERATION)
    floor = await round_trips(floor_pki, pki.issue(floor_pki, R.ANTENNA, "floor"),
                              pki.issue(floor_pki, R.USER, "floor", "bench"), queries)
    return {"finished": finished, "active": active, "journal_mb": round(size_mb, 1),
            "fill_s": round(filled, 1), "hub_start_s": round(ready, 2), "queries": queries,
            "status_p50_ms": round(1000 * percentile(latencies, 0.5), 3),
            "status_p99_ms": round(1000 * percentile(latencies, 0.99), 3),
            "grpc_floor_p50_ms": round(1000 * percentile(floor, 0.5), 3),
            "grpc_floor_p99_ms": round(1000 * percentile(floor, 0.99), 3),
            "hub_rss_mb": round(rss, 1), "hub_peak_rss_mb": round(peak, 1)}


def run_scale_bench(finished: int, active: int, queries: int, as_json: bool, keep: Path | None = None) -> int:
    with workdir(keep, "aifed-bench-scale-") as root:
        print(f"filling a hub journal with {finished} finished and {active} active jobs...", file=sys.stderr)
        r = asyncio.run(scale_run(root, finished, active, queries))
        print(f"journal {r['journal_mb']:.0f} MB (filled in {r['fill_s']:.0f} s); hub up in {r['hub_start_s']:.1f} s; "
              f"status query p50 {r['status_p50_ms']:.2f} ms p99 {r['status_p99_ms']:.2f} ms over {queries}; "
              f"hub resident memory {r['hub_rss_mb']:.0f} MB (peak {r['hub_peak_rss_mb']:.0f} MB)")
        print(f"gRPC floor, the same number of calls to a handler that does nothing: p50 {r['grpc_floor_p50_ms']:.2f} "
              f"ms p99 {r['grpc_floor_p99_ms']:.2f} ms")
        if as_json:
            print(orjson.dumps(r).decode())
        return 0
