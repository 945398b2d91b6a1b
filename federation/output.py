"""How the CLI shows jobs and sites: aligned tables for people, JSON for scripts."""

from __future__ import annotations

import datetime as dt
import time

from federation import convert
from federation.model import AccessMode, Job, JobState
from federation.pb import antenna_pb2, hub_pb2
from federation.timefmt import format_duration


def when(seconds: float) -> str:
    if not seconds:
        return "-"
    return dt.datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M:%S")


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip() for r in [headers, *rows]]
    return "\n".join(lines)


def job_dict(job: Job) -> dict:
    s = job.spec
    return {
        "id": job.id, "state": job.state.name, "site": job.site, "partition": job.partition,
        "exit_code": job.exit_code, "reason": job.reason, "owner": job.owner, "antenna": job.antenna,
        "created_at": job.created_at, "updated_at": job.updated_at,
        "spec": {"name": s.name, "argv": list(s.argv), "script": bool(s.script), "script_args": list(s.script_args),
                 "gpus": s.gpus, "cpus": s.cpus, "memory_mb": s.memory_mb, "walltime_s": s.walltime_s,
                 "partition": s.partition, "access_mode": s.access_mode.slug if s.access_mode else "",
                 "project": s.project, "site": s.site, "env": sorted(s.env),
                 **({"array_job": s.array_job, "array_task": s.array_task} if s.array_job else {})},
        "history": [{"state": t.state.name, "at": t.at, "reason": t.reason} for t in job.history],
    }


def job_rows(jobs: list[Job]) -> str:
    rows = [[j.id, j.spec.name or "-", j.state.name, j.site or "-", j.partition or "-", str(j.spec.gpus),
             format_duration(j.spec.walltime_s), "-" if j.exit_code is None else str(j.exit_code),
             when(j.created_at)] for j in jobs]
    return table(["JOBID", "NAME", "STATE", "SITE", "PARTITION", "GPUS", "TIME_LIMIT", "EXIT", "SUBMITTED"], rows)


def job_detail(job: Job) -> str:
    s = job.spec
    command = " ".join(s.argv) if s.argv else f"(script, {len(s.script.splitlines())} lines) " + " ".join(
        s.script_args)
    lines = [
        f"JobId={job.id} Name={s.name or '-'}"
        + (f" ArrayJobId={s.array_job} ArrayTaskId={s.array_task}" if s.array_job else ""),
        f"   State={job.state.name}" + (f" Reason={job.reason}" if job.reason else ""),
        f"   ExitCode={'-' if job.exit_code is None else job.exit_code}",
        f"   Site={job.site or '-'} Partition={job.partition or '-'} Antenna={job.antenna}",
        f"   GPUs={s.gpus} CPUs={s.cpus} Memory={s.memory_mb or '-'}MB TimeLimit={format_duration(s.walltime_s)}"
        + (f" Mode={AccessMode(s.access_mode).slug}" if s.access_mode else "")
        + (f" Project={s.project}" if s.project else ""),
        f"   Command={command}",
        f"   Owner={job.owner}",
        "   History:",
    ]
    for t in job.history:
        lines.append(f"     {when(t.at)}  {t.state.name:<9}  {t.reason}")
    return "\n".join(lines)


def site_rows(sites: list[antenna_pb2.Site]) -> str:
    rows = []
    now = time.time()
    for s in sites:
        status = site_health(s)
        if not s.HasField("advert"):
            rows.append([s.site, status, "-", "-", "-", "-", "-", "-", s.error or "-"])
            continue
        age = now - s.advert_received_at.ToNanoseconds() / 1e9
        for p in s.advert.partitions:
            rows.append([s.site, status, p.name, p.gpu_model or "-", f"{p.gpus_free}/{p.gpus_total}",
                         str(p.running_jobs), str(p.pending_jobs), format_duration(p.max_walltime_s),
                         f"{age:.0f}s" if s.reachable else (s.error or "-")])
    return table(["SITE", "STATUS", "PARTITION", "GPU_MODEL", "FREE/TOTAL", "RUNNING", "PENDING", "MAX_TIME",
                  "ADVERT_AGE"], rows)


def expiry_warnings(listing: antenna_pb2.ListSitesResponse, days: int = 30) -> list[str]:
    """A line for the antenna's and each hub's certificate that expires within `days`."""
    now, out = time.time(), []
    owners = [("the antenna", listing.cert_expires_at)] + [
        (f"hub {s.site}", s.advert.cert_expires_at) for s in listing.sites if s.HasField("advert")]
    for who, when in owners:
        at = when.ToNanoseconds() / 1e9
        if at and at - now < days * 86400:
            out.append(f"warning: {who}'s certificate expires on "
                       f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(at))}; its operator must renew it")
    return out


def site_dict(s: antenna_pb2.Site) -> dict:
    out = {"site": s.site, "endpoint": s.endpoint, "reachable": s.reachable, "error": s.error, "partitions": []}
    if s.HasField("advert"):
        a = s.advert
        out.update(services=list(a.services), sectors=list(a.sectors),
                   access_modes=[AccessMode(m).slug for m in a.access_modes], sequence=a.sequence,
                   advert_received_at=s.advert_received_at.ToNanoseconds() / 1e9, health=site_health(s),
                   degraded=a.degraded, draining=a.draining, drain_reason=a.drain_reason,
                   cert_expires_at=s.advert.cert_expires_at.ToNanoseconds() / 1e9)
        out["partitions"] = [{"name": p.name, "gpu_model": p.gpu_model, "gpus_total": p.gpus_total,
                              "gpus_free": p.gpus_free, "running_jobs": p.running_jobs,
                              "pending_jobs": p.pending_jobs, "pending_gpu_seconds": p.pending_gpu_seconds,
                              "max_walltime_s": p.max_walltime_s, "gflops_per_watt": p.gflops_per_watt}
                             for p in a.partitions]
    return out


def _gpuh(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".") if abs(value) >= 0.005 else "0"


def _utc(stamp) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp.ToNanoseconds() / 1e9))


def usage_dict(usage: antenna_pb2.UsageResponse) -> dict:
    return {
        "allocations": [{"project": a.project, "hub": a.hub or "federation",
                         "modes": [AccessMode(m).slug for m in a.modes], "start": _utc(a.start), "end": _utc(a.end),
                         "gpu_hours": a.gpu_hours, "used": a.used_gpu_hours, "reserved": a.reserved_gpu_hours,
                         "remaining": a.remaining_gpu_hours, "jobs": a.jobs} for a in usage.allocations],
        "users": [{"project": u.project, "user": u.owner, "used": u.used_gpu_hours, "reserved": u.reserved_gpu_hours,
                   "jobs": u.jobs} for u in usage.users],
    }


def usage_rows(usage: antenna_pb2.UsageResponse) -> str:
    """`aifed usage`: one row per allocation, then GPU-hours per project and user."""
    if not usage.allocations:
        return "no allocations you can see at this antenna"
    rows = [[a.project, a.hub or "federation", ",".join(AccessMode(m).slug for m in a.modes) or "any",
             _utc(a.start), _utc(a.end), _gpuh(a.gpu_hours), _gpuh(a.used_gpu_hours), _gpuh(a.reserved_gpu_hours),
             _gpuh(a.remaining_gpu_hours), str(a.jobs)] for a in usage.allocations]
    out = table(["PROJECT", "HUB", "MODES", "START", "END", "GPU_HOURS", "USED", "RESERVED", "REMAINING", "JOBS"],
                rows)
    if usage.users:
        users = [[u.project, u.owner.rpartition("/")[2], _gpuh(u.used_gpu_hours), _gpuh(u.reserved_gpu_hours),
                  str(u.jobs)] for u in usage.users]
        out += "\n\n" + table(["PROJECT", "USER", "USED", "RESERVED", "JOBS"], users)
    return out


def hub_usage_dict(usage: hub_pb2.HubUsageResponse) -> dict:
    return {"site": usage.site, "since": _utc(usage.since),
            "rows": [{"antenna": r.antenna, "project": r.project, "mode": AccessMode(r.mode).slug,
                      "used": r.used_gpu_hours, "reserved": r.reserved_gpu_hours, "jobs": r.jobs} for r in usage.rows]}


def hub_usage_rows(usage: hub_pb2.HubUsageResponse) -> str:
    """`aifed usage --hub`: GPU-hours per antenna, project and mode, then a total per antenna."""
    head = f"hub {usage.site}, jobs accepted since {_utc(usage.since)}"
    if not usage.rows:
        return f"{head}: none"
    rows = [[r.antenna, r.project or "-", AccessMode(r.mode).slug if r.mode else "-", _gpuh(r.used_gpu_hours),
             _gpuh(r.reserved_gpu_hours), str(r.jobs)] for r in usage.rows]
    totals: dict[str, list] = {}
    for r in usage.rows:
        t = totals.setdefault(r.antenna, [0.0, 0.0, 0])
        t[0] += r.used_gpu_hours
        t[1] += r.reserved_gpu_hours
        t[2] += r.jobs
    per_antenna = [[a, _gpuh(u), _gpuh(res), str(n)] for a, (u, res, n) in sorted(totals.items())]
    return (head + "\n\n" + table(["ANTENNA", "PROJECT", "MODE", "USED", "RESERVED", "JOBS"], rows) + "\n\n"
            + table(["ANTENNA", "USED", "RESERVED", "JOBS"], per_antenna))


def state_names() -> list[str]:
    return [s.name for s in JobState]


def site_health(s: antenna_pb2.Site) -> str:
    """One word for a hub as the antenna sees it."""
    if s.left:
        return "left"
    if not s.reachable:
        return "revoked" if "revoked" in s.error else "down"
    if s.advert.draining:
        return "draining"
    if s.advert.degraded:
        return "degraded"
    return "up"


def top_view(listing: antenna_pb2.ListSitesResponse, jobs: list[Job], antenna: str, now: float,
             width: int = 120) -> str:
    """`aifed top`: the federation as one antenna sees it, and the most recent jobs."""
    header = (f"aifed top - antenna {antenna} - {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(now))}")
    sites, gpus_free, gpus_total = [], 0, 0
    for s in listing.sites:
        health = site_health(s)
        if not s.HasField("advert"):
            sites.append([s.site, health, "-", "-", "-", "-", "-", "-", (s.error or "-")[:40]])
            continue
        age = now - s.advert_received_at.ToNanoseconds() / 1e9
        for p in s.advert.partitions:
            gpus_free, gpus_total = gpus_free + p.gpus_free, gpus_total + p.gpus_total
            # The queue ahead of a new job, spread over the partition's GPUs (or its CPU slots).
            wait = p.pending_gpu_seconds / p.gpus_total if p.gpus_total else 0.0
            sites.append([s.site, health, p.name, p.gpu_model or "-", f"{p.gpus_free}/{p.gpus_total}",
                          str(p.running_jobs), str(p.pending_jobs), format_duration(int(wait)) if wait else "0",
                          f"{age:.0f}s"])
    up = sum(1 for s in listing.sites if site_health(s) == "up")
    summary = (f"{len(listing.sites)} hub(s), {up} up; GPUs free {gpus_free}/{gpus_total}; "
               f"jobs here: " + ", ".join(f"{n} {state.name.lower()}" for state, n in _count_states(jobs)))
    recent = [[j.id, j.state.name, j.site or "-", j.spec.name or "-", str(j.spec.gpus),
               format_duration(int(max(now - j.updated_at, 0))) + " ago", (j.reason or "-")[:50]]
              for j in jobs[:15]]
    parts = [header, summary, "",
             table(["SITE", "HEALTH", "PARTITION", "GPU_MODEL", "FREE/TOTAL", "RUNNING", "PENDING", "QUEUE_WAIT",
                    "ADVERT_AGE"], sites),
             "", "RECENT JOBS",
             table(["JOBID", "STATE", "SITE", "NAME", "GPUS", "CHANGED", "REASON"], recent) if recent else "(none)"]
    return "\n".join(line[:width] for line in "\n".join(parts).splitlines())


def _count_states(jobs: list[Job]) -> list[tuple[JobState, int]]:
    counts: dict[JobState, int] = {}
    for j in jobs:
        counts[j.state] = counts.get(j.state, 0) + 1
    return sorted(counts.items(), key=lambda kv: kv[0].value) or [(JobState.PENDING, 0)]


def _verdict(v: antenna_pb2.SiteVerdict) -> str:
    if v.reason:
        return ("not now: " if v.transient else "excluded: ") + v.reason
    return f"fits: would start in about {v.wait_s:.0f} s" if v.has_wait else "fits"


def explanation_text(e: antenna_pb2.Explanation) -> str:
    """`aifed explain`: the job's status, then every hub's verdict in placement's order."""
    job = convert.job_from_pb(e.job)
    lines = [f"Job {job.id} is {job.state.name}: {e.status}"]
    if e.pinned:
        lines.append(f"It is {e.pinned}.")
    if e.allocation:
        lines.append(f"Allocation: {e.allocation}.")
    if e.placed:
        lines.append(f"Placed {when(convert.from_ts(e.placed_at))}: {e.placed}")
    rows = [[str(v.rank) if v.rank else "-", v.site,
             _verdict(v) + ("   <- the job is here" if v.site == job.site else "")] for v in e.sites]
    lines += ["", table(["RANK", "HUB", "VERDICT NOW"], rows) if rows else "(no hub known to this antenna)"]
    return "\n".join(lines)


def explanation_dict(e: antenna_pb2.Explanation) -> dict:
    return {"job": job_dict(convert.job_from_pb(e.job)), "status": e.status, "pinned": e.pinned,
            "allocation": e.allocation, "placed": e.placed or None,
            "placed_at": convert.from_ts(e.placed_at) if e.placed else None,
            "sites": [{"site": v.site, "fits": not v.reason, "reason": v.reason, "transient": v.transient,
                       "wait_s": v.wait_s if v.has_wait else None, "rank": v.rank or None} for v in e.sites]}
