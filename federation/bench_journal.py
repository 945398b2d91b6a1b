"""`aifed bench journal`: what journaling a job costs as a journal grows, with job ids that sort by time (what
antennas make: `federation.ids.job_token`) against random ones (what they made before), in the same command.

Two journals on the same disk, written alternately batch by batch as a hub writes them: a batch of new jobs in
one transaction (the job id as the idempotency key), then one more transaction that moves each of them on (a
state change). Every write is durable (WAL, synchronous=FULL), as in the daemons. The figures are the CPU and the
wall-clock time per job of each tenth of the run, so that a cost that grows with the journal shows.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import orjson

KINDS = ("time-ordered", "random")


def journal_run(root: Path, jobs: int, batch: int) -> dict:
    from federation.ids import job_token, random_hex
    from federation.journal import Journal
    from federation.bench import bench_spec
    from federation.model import Job, JobState

    root.mkdir(parents=True, exist_ok=True)
    antenna = "antenna1"
    make_id = {"time-ordered": lambda: f"{antenna}-{job_token()}", "random": lambda: f"{antenna}-{random_hex(6)}"}
    journals = {kind: Journal(root / f"{kind}.db") for kind in KINDS}
    owner = f"spiffe://aifed.bench/user/{antenna}/bench"
    spec = bench_spec()
    windows = 10
    per_window = max(1, jobs // batch // windows)
    spent = {kind: {"cpu": 0.0, "wall": 0.0, "jobs": 0} for kind in KINDS}
    tenths: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    try:
        for n in range(per_window * windows):
            for kind in KINDS if n % 2 == 0 else reversed(KINDS):  # neither always goes first
                now = time.time()
                new = [Job(id=make_id[kind](), spec=spec, state=JobState.PENDING, owner=owner, antenna=antenna,
                           site="hub1", created_at=now, updated_at=now) for _ in range(batch)]
                cpu, wall = time.thread_time(), time.perf_counter()
                journals[kind].write(lambda tx, new=new: [tx.insert(j, j.id, checked=True) for j in new])
                journals[kind].write(lambda tx, new=new: [tx.update(j.moved(JobState.FORWARDED, "accepted"))
                                                          for j in new])
                s = spent[kind]
                s["cpu"] += time.thread_time() - cpu
                s["wall"] += time.perf_counter() - wall
                s["jobs"] += batch
            if (n + 1) % per_window == 0:
                for kind in KINDS:
                    s = spent[kind]
                    tenths[kind].append({"cpu_us_per_job": round(1e6 * s["cpu"] / s["jobs"], 1),
                                         "wall_us_per_job": round(1e6 * s["wall"] / s["jobs"], 1)})
                    spent[kind] = {"cpu": 0.0, "wall": 0.0, "jobs": 0}
    finally:
        for journal in journals.values():
            journal.close()
    out: dict = {"jobs": per_window * windows * batch, "batch": batch}
    for kind in KINDS:
        t = tenths[kind]
        out[kind] = {"first_tenth": t[0], "last_tenth": t[-1],
                     "median_cpu_us_per_job": statistics.median(x["cpu_us_per_job"] for x in t),
                     "median_wall_us_per_job": statistics.median(x["wall_us_per_job"] for x in t),
                     "journal_mb": round((root / f"{kind}.db").stat().st_size / 2**20, 1), "tenths": t}
    last = {kind: out[kind]["last_tenth"]["cpu_us_per_job"] for kind in KINDS}
    out["last_tenth_cpu_ratio"] = round(last["time-ordered"] / last["random"], 3)
    return out


def run_journal_bench(jobs: int, batch: int, as_json: bool, keep: Path | None = None) -> int:
    from federation.bench import workdir
    from federation.cli import UsageError

    if jobs < 10 * batch or batch < 1:
        raise UsageError(f"--jobs {jobs} --batch {batch}: give at least ten batches (--jobs >= 10 x --batch)")
    with workdir(keep, "aifed-bench-journal-") as root:
        print(f"journaling {jobs} jobs twice, in batches of {batch}: ids that sort by time, and random ids...",
              file=sys.stderr)
        r = journal_run(root, jobs, batch)
    print(f"{r['jobs']} jobs, batches of {r['batch']}: CPU per job (insert and one update), first and last tenth")
    for kind in KINDS:
        k = r[kind]
        print(f"  {kind:>12} ids: {k['first_tenth']['cpu_us_per_job']:6.1f} -> {k['last_tenth']['cpu_us_per_job']:6.1f}"
              f" us (wall {k['first_tenth']['wall_us_per_job']:.1f} -> {k['last_tenth']['wall_us_per_job']:.1f} us);"
              f" median {k['median_cpu_us_per_job']:.1f} us; journal {k['journal_mb']:.0f} MiB")
    print(f"  last tenth, time-ordered over random: {r['last_tenth_cpu_ratio']:.2f}")
    if as_json:
        print(orjson.dumps(r).decode())
    return 0
