"""`aifed bench data`: staging throughput, user -> antenna -> hub and back (aifed fetch), mTLS, against `cp`.

Each run writes a fresh file of `mb` MiB (new content, so nothing is held already), times `cp` of it (the
ceiling: the same bytes through the same disk, no network, no checks), then times the federation path: the
client's upload to the antenna (PutBlob, SHA-256 checked there) and the antenna's transfer to the hub before the
job is forwarded (checked again there), until the hub holds the job. The job (local executor) collects its own
input as its output, and `aifed fetch` brings it back through the antenna (checked against its SHA-256). The
client's own hashing of the file is timed apart (it is the same work `sha256sum` does)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import orjson

from federation.bench import BenchFederation, cpu_seconds, workdir
from federation.cli import _fetch


def _write_file(path: Path, mb: int, seed: int) -> None:
    block = hashlib.sha256(str(seed).encode()).digest() * (1 << 15)  # 1 MiB, different per run
    with open(path, "wb") as f:
        for i in range(mb):
            f.write(i.to_bytes(8, "little") + block[8:])


async def _federation_run(fed: BenchFederation, client, path: Path) -> dict:
    from federation.blobs import describe_inputs
    from federation.model import JobSpec, JobState

    pids = {"client": os.getpid(), "antenna": fed.procs["antenna"].pid, "hub": fed.procs["hub1"].pid}
    cpu: dict[str, float] = {}

    def sample(phase: str, start: dict[str, float] | None = None) -> dict[str, float]:
        now = {name: cpu_seconds(pid) for name, pid in pids.items()}
        if start is not None:
            cpu.update({f"{phase}_{name}_cpu_s": now[name] - start[name] for name in pids})
        return now

    started = time.perf_counter()
    inputs, sources = await asyncio.to_thread(describe_inputs, [(path.name, path)])
    hashed = time.perf_counter()
    c = sample("")
    info = await client.upload(path, inputs[0].sha256, inputs[0].size, timeout=3600)
    assert info.complete, info
    uploaded = time.perf_counter()
    c = sample("upload", c)
    # The job collects its own input as its output: the same bytes come back for the fetch.
    job = await client.submit(JobSpec(argv=("true",), walltime_s=60, site="hub1", inputs=inputs,
                                      outputs=(path.name,)))
    while (job := await client.get(job.id)).state is JobState.PENDING:
        await asyncio.sleep(0.01)
    assert not job.final or job.state is JobState.COMPLETED, f"{job.state.name}: {job.reason}"
    staged = time.perf_counter()
    sample("stage", c)
    while not (await client.list_outputs(job.id)).ready:
        await asyncio.sleep(0.05)
    to = path.parent / "fetched"
    started_fetch = time.perf_counter()
    c = sample("")
    with contextlib.redirect_stdout(io.StringIO()):
        await _fetch(client, job.id, to, as_json=False)
    fetched = time.perf_counter()
    sample("fetch", c)
    assert (to / path.name).stat().st_size == inputs[0].size
    (to / path.name).unlink()
    return {"hash_s": hashed - started, "upload_s": uploaded - hashed, "stage_s": staged - uploaded,
            "fetch_s": fetched - started_fetch, **cpu}


async def _runs(root: Path, mb: int, runs: int) -> list[dict]:
    fed = BenchFederation(root, "local")
    fed.start_all()
    out = []
    try:
        async with fed.client() as client:
            await fed.wait_ready(client)
            for run in range(runs):
                path = root / f"input-{run}.bin"
                _write_file(path, mb, run)
                os.sync()
                started = time.perf_counter()
                subprocess.run(["cp", str(path), str(root / f"copy-{run}.bin")], check=True)
                cp_s = time.perf_counter() - started
                (root / f"copy-{run}.bin").unlink()
                r = await _federation_run(fed, client, path)
                r["cp_s"] = cp_s
                out.append(r)
                path.unlink()
                print(f"run {run + 1}: cp {mb / cp_s:7.0f} MiB/s; client hash {mb / r['hash_s']:6.0f} MiB/s; upload "
                      f"to the antenna {mb / r['upload_s']:6.0f} MiB/s; antenna to hub {mb / r['stage_s']:6.0f} "
                      f"MiB/s; fetch {mb / r['fetch_s']:6.0f} MiB/s", file=sys.stderr)
    finally:
        fed.stop()
    return out


def run_data_bench(mb: int, runs: int, as_json: bool, keep: Path | None = None) -> int:
    with workdir(keep, "aifed-bench-data-") as root:
        results = asyncio.run(_runs(root, mb, runs))
    med = {k: statistics.median(r[k] for r in results) for k in results[0]}
    cp = mb / med["cp_s"]
    upload = mb / med["upload_s"]
    stage = mb / med["stage_s"]
    through = mb / (med["upload_s"] + med["stage_s"])  # user to hub, both hops, checks included
    summary = {"mb": mb, "runs": runs, "cp_mb_per_s": round(cp, 1), "hash_mb_per_s": round(mb / med["hash_s"], 1),
               "upload_mb_per_s": round(upload, 1), "stage_mb_per_s": round(stage, 1),
               "user_to_hub_mb_per_s": round(through, 1), "upload_ratio": round(upload / cp, 3),
               "fetch_mb_per_s": round(mb / med["fetch_s"], 1), "fetch_ratio": round(mb / med["fetch_s"] / cp, 3),
               "user_to_hub_ratio": round(through / cp, 3)}
    print(f"medians of {runs} runs of {mb} MiB: cp {cp:.0f} MiB/s; upload to the antenna {upload:.0f} MiB/s "
          f"({upload / cp:.2f} of cp); antenna to hub {stage:.0f} MiB/s; user to hub, both hops "
          f"{through:.0f} MiB/s ({through / cp:.2f} of cp); fetch, hub to user through the antenna "
          f"{summary['fetch_mb_per_s']:.0f} MiB/s ({summary['fetch_ratio']:.2f} of cp); client hashing "
          f"{summary['hash_mb_per_s']:.0f} MiB/s")
    # CPU-seconds per GiB moved, per process and phase (the client is this process: it also polls and waits)
    gib = mb / 1024
    summary["cpu_s_per_gib"] = {phase: {name: round(med[f"{phase}_{name}_cpu_s"] / gib, 2)
                                        for name in ("client", "antenna", "hub")}
                                for phase in ("upload", "stage", "fetch")}
    print("CPU-seconds per GiB, medians: " + "; ".join(
        f"{phase} " + ", ".join(f"{name} {v:.1f}" for name, v in by.items())
        for phase, by in summary["cpu_s_per_gib"].items()))
    if as_json:
        print(orjson.dumps(summary).decode())
    return 0
