"""`aifed bench crash`: acknowledged jobs survive SIGKILL of any daemon, and none runs twice.

Two hubs (local backend) and an antenna run as separate processes. Clients submit a burst of jobs in bulk calls,
each call with a request id so that a call whose answer was lost can be retried without creating jobs twice.
Meanwhile the daemons are killed with SIGKILL at random moments (the antenna, a hub, or all of them) and
restarted, `kills` times. Each job appends its id to a shared file when it runs, so every execution is on
record. At the end, every acknowledged job must exist at exactly one hub, have ended there, and have run at
most once: the harness prints "acknowledged N, lost L, duplicated D" and names the offending ids.
"""

from __future__ import annotations

import asyncio
import collections
import random
import signal
import sys
import time
from pathlib import Path

import grpc
import orjson

from federation.bench import BenchFederation, workdir
from federation.errors import AifedError
from federation.model import FINAL_STATES, JobSpec, JobState


async def crash_run(root: Path, jobs: int, kills: int, seed: int, batch: int = 25, clients: int = 4,
                    say=lambda text: None) -> dict:
    rng = random.Random(seed)
    fed = BenchFederation(root, "local", partition="cpu", hubs=2, cpu_slots=8)
    executions = root / "executions.log"
    executions.touch()
    spec = JobSpec(argv=("sh", "-c", f'echo "$AIFED_JOB_ID" >> {executions}'), walltime_s=600)
    fed.start_all()
    client = fed.client()
    acknowledged: dict[str, None] = {}
    next_call = iter(range(10**9))
    remaining = [jobs]
    try:
        await fed.wait_ready(client, timeout=120)

        # The burst is spread over the time the kills take, so that every kill lands in the middle of it.
        interval = batch * clients / (jobs / max(1.0, kills * 1.9))

        async def submitter(worker: int) -> None:
            while remaining[0] > 0:
                call_started = time.monotonic()
                n = min(batch, remaining[0])
                remaining[0] -= n
                request_id = f"burst-{worker}-{next(next_call)}"
                while True:  # retried with the same request id until the antenna answers
                    try:
                        results = await client.submit_many([(spec, request_id, f"0-{n - 1}")], timeout=20)
                        break
                    except grpc.aio.AioRpcError:
                        await asyncio.sleep(0.2)
                for r in results:
                    if isinstance(r, AifedError):
                        raise RuntimeError(f"a submission was refused: {r.message}")
                    acknowledged[r.id] = None
                await asyncio.sleep(max(0.0, interval - (time.monotonic() - call_started)))

        async def killer() -> None:
            for i in range(kills):
                await asyncio.sleep(rng.uniform(0.3, 2.5))
                victims = rng.choice([["antenna"], ["hub1"], ["hub2"], ["antenna", "hub1", "hub2"]])
                say(f"kill {i + 1}/{kills}: SIGKILL {', '.join(victims)} "
                    f"({len(acknowledged)} acknowledged so far)")
                for name in victims:
                    fed.stop(name, signal.SIGKILL)
                await asyncio.sleep(rng.uniform(0.0, 1.0))
                for name in victims:
                    fed.start(name)

        async def submit_all() -> None:
            await asyncio.gather(*(submitter(w) for w in range(clients)))

        await asyncio.gather(submit_all(), killer())
        say(f"{len(acknowledged)} acknowledged; waiting for every job to end...")
        await fed.wait_ready(client, timeout=120)
        final = ",".join(str(int(s)) for s in FINAL_STATES)
        deadline = time.monotonic() + 600
        while True:
            open_jobs = fed.query("antenna", f"SELECT count(*) FROM jobs WHERE state NOT IN ({final})")
            if open_jobs and open_jobs[0][0] == 0:
                break
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        at_hubs: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
        for site in fed.hubs:
            for job_id, state in fed.query(site, "SELECT id, state FROM jobs"):
                at_hubs[job_id].append((site, state))
        runs = collections.Counter(line.strip() for line in executions.read_text().splitlines() if line.strip())
        antenna_states = dict(fed.query("antenna", "SELECT id, state FROM jobs"))
        lost = [j for j in acknowledged if j not in at_hubs or j not in antenna_states]
        twice_placed = [j for j, where in at_hubs.items() if len(where) > 1]
        ran_twice = [j for j, n in runs.items() if n > 1]
        unfinished = [j for j in acknowledged if j in at_hubs and not any(st in {int(s) for s in FINAL_STATES}
                                                                          for _, st in at_hubs[j])]
        never_acknowledged = [j for j in runs if j not in acknowledged]
        # LOST: launched while the hub was being killed, with no sign it ran; honest, and never run again.
        reported_lost = [j for j in acknowledged if any(st == int(JobState.LOST) for _, st in at_hubs.get(j, ()))]
        return {"acknowledged": len(acknowledged), "lost": len(lost), "duplicated": len(twice_placed) + len(ran_twice),
                "ran": sum(1 for j in acknowledged if runs.get(j)), "unfinished": len(unfinished),
                "ran_unacknowledged": len(never_acknowledged), "reported_lost": len(reported_lost), "kills": kills,
                "seed": seed,
                "lost_ids": lost[:20], "duplicated_ids": (twice_placed + ran_twice)[:20],
                "unfinished_ids": unfinished[:20]}
    finally:
        await client.close()
        fed.stop()


def run_crash_bench(jobs: int, kills: int, seed: int | None, as_json: bool, keep: Path | None = None) -> int:
    seed = random.randrange(1 << 30) if seed is None else seed
    with workdir(keep, "aifed-crash-") as root:
        print(f"{jobs} jobs, {kills} kills, seed {seed}, in {root}", file=sys.stderr)
        r = asyncio.run(crash_run(root, jobs, kills, seed, say=lambda text: print(text, file=sys.stderr)))
        print(f"acknowledged {r['acknowledged']}, lost {r['lost']}, duplicated {r['duplicated']}")
        print(f"(ran {r['ran']}, not ended {r['unfinished']}, reported LOST by a hub {r['reported_lost']}, ran "
              f"without acknowledgement {r['ran_unacknowledged']}; seed {seed})")
        for key in ("lost_ids", "duplicated_ids", "unfinished_ids"):
            if r[key]:
                print(f"{key.replace('_', ' ')}: {' '.join(r[key])}")
        if as_json:
            print(orjson.dumps(r).decode())
        return 0 if r["lost"] == 0 and r["duplicated"] == 0 and r["unfinished"] == 0 else 1
