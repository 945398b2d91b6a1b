"""`aifed bench slurm`: is aifed ever the bottleneck in front of Slurm?

Starts a private Slurm (hub/slurmlab.py), then submits N trivial jobs (a) directly, `sbatch` in a loop, and
(b) through an antenna and a hub (separate processes, mutual TLS, durable journals, the Slurm backend) into the
same Slurm, with 16 submissions in flight. Phase (b) ends when all N jobs are in Slurm (`squeue`, by their
`aifed:` tag). Prints both throughputs and their ratio; with --json, one JSON object on the last line.
"""

from __future__ import annotations

import asyncio
import os
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


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _squeue_tagged(env: dict) -> int:
    out = subprocess.run(["squeue", "--json"], env=env, capture_output=True, text=True, timeout=60)
    return sum(1 for j in orjson.loads(out.stdout).get("jobs", []) if str(j.get("comment", "")).startswith("aifed:"))


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


async def run_federation(env: dict, jobs: int, root: Path, in_flight: int = 16) -> dict:
    from federation.client import AntennaClient
    from federation.config import ClientConfig
    from federation.model import JobSpec
    from federation.tls import TlsFiles

    p = root / "pki"
    pki.init_ca(p, FEDERATION)
    hub, antenna = pki.issue(p, Role.HUB, "hub1"), pki.issue(p, Role.ANTENNA, "antenna1")
    user = pki.issue(p, Role.USER, "antenna1", "bench")
    hub_port, antenna_port = free_port(), free_port()
    tls = lambda i: f'[tls]\nca = "{p / "ca.pem"}"\ncert = "{i.cert}"\nkey = "{i.key}"\n'  # noqa: E731
    hub_cfg = _write(root / "hub.toml", f'''[hub]
site = "hub1"
federation = "{FEDERATION}"
listen = "127.0.0.1:{hub_port}"
state_dir = "{root / 'hub'}"

[backend]
type = "slurm"
slurm_conf = "{env['SLURM_CONF']}"
poll_interval = "2s"
capacity_interval = "10s"
cpu_slots = 16

[[partitions]]
name = "debug"
max_walltime = "1:00:00"

{tls(hub)}''')
    antenna_cfg = _write(root / "antenna.toml", f'''[antenna]
site = "antenna1"
federation = "{FEDERATION}"
listen = "127.0.0.1:{antenna_port}"
state_dir = "{root / 'antenna'}"

[[hubs]]
site = "hub1"
endpoint = "127.0.0.1:{hub_port}"

{tls(antenna)}''')
    daemon_env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    procs = [subprocess.Popen([sys.executable, "-m", "federation.cli", kind, "--config", str(cfg)],
                              stdout=open(root / f"{kind}.log", "wb"), stderr=subprocess.STDOUT, env=daemon_env)
             for kind, cfg in (("hub", hub_cfg), ("antenna", antenna_cfg))]
    try:
        client = AntennaClient(ClientConfig(f"127.0.0.1:{antenna_port}", TlsFiles(p / "ca.pem", user.cert, user.key)))
        deadline = time.monotonic() + 60
        while not any(s.reachable for s in await _sites(client)):
            if time.monotonic() > deadline or any(pr.poll() is not None for pr in procs):
                raise RuntimeError(f"the federation did not come up; see {root}/*.log")
            await asyncio.sleep(0.2)
        spec = JobSpec(argv=("true",), walltime_s=60, partition="debug")
        latencies: list[float] = []
        queue = iter(range(jobs))

        async def submitter():
            for _ in queue:
                t = time.perf_counter()
                await client.submit(spec)
                latencies.append(time.perf_counter() - t)

        started = time.perf_counter()
        await asyncio.gather(*(submitter() for _ in range(in_flight)))
        acknowledged = time.perf_counter() - started
        while await asyncio.to_thread(_squeue_tagged, env) < jobs:
            if time.perf_counter() - started > 600:
                raise RuntimeError("not every job reached Slurm within 600 s")
            await asyncio.sleep(0.2)
        in_slurm = time.perf_counter() - started
        await client.close()
        latencies.sort()
        return {"federation_jobs_per_s": jobs / in_slurm, "acknowledged_per_s": jobs / acknowledged,
                "submit_p50_ms": 1000 * latencies[len(latencies) // 2],
                "submit_p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]}
    finally:
        for pr in procs:
            pr.send_signal(signal.SIGTERM)
        for pr in procs:
            try:
                pr.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pr.kill()


async def _sites(client):
    try:
        return await client.sites()
    except Exception:  # noqa: BLE001 - not up yet
        return []


def run_slurm_bench(jobs: int, as_json: bool, keep: Path | None = None) -> int:
    from hub.slurmlab import SlurmLab, SlurmLabError

    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="aifed-bench-"))
    lab = SlurmLab(root / "slurm", partitions={"debug": 0}, gpus=1, cpus=64)
    try:
        lab.start()
    except SlurmLabError as exc:
        print(f"aifed: {exc}", file=sys.stderr)
        return 4
    try:
        env = lab.env
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
        if as_json:
            print(orjson.dumps(result).decode())
        return 0
    finally:
        lab.stop()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
