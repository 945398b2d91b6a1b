"""Placement: which hubs could run a job (filters, each with its reason) and which one starts it first."""

from __future__ import annotations

import time

from dataclasses import dataclass

from federation.config import quota_why_not
from federation.model import JobSpec
from federation.pb import jobs_pb2
from federation.timefmt import format_duration


@dataclass(frozen=True)
class Verdict:
    site: str
    reason: str = ""          # why the site cannot take the job; empty if it can
    wait_s: float | None = None
    transient: bool = False   # the reason may pass (an unreachable hub); a permanent one will not

    @property
    def fits(self) -> bool:
        return not self.reason


def why_not(spec: JobSpec, advert: jobs_pb2.Advert, country: str = "") -> str:
    """Why a hub with this advert could never run the job, or "" if it can (a drain is only for now: see
    `Verdict.transient` in the antenna)."""
    if spec.sector_required and spec.sector not in advert.sectors:
        return f"does not specialise in sector {spec.sector}"
    if advert.countries and country not in advert.countries:
        return (f"serves users from {', '.join(advert.countries)} only, and this job is from "
                + (country or "no declared country (antenna.country, or its project's or user's country in the "
                              "allocations file)"))
    parts = list(advert.partitions)
    if spec.partition:
        parts = [p for p in parts if p.name == spec.partition]
        if not parts:
            return f"has no partition {spec.partition!r}"
    if spec.access_mode and advert.access_modes and spec.access_mode not in advert.access_modes:
        return f"does not accept access mode {spec.access_mode.slug}"
    for limits in advert.mode_limits:
        if limits.mode == spec.access_mode:
            if limits.max_gpus and spec.gpus > limits.max_gpus:
                return f"allows at most {limits.max_gpus} GPU(s) per job in {spec.access_mode.slug}"
            if limits.max_walltime_s and spec.walltime_s > limits.max_walltime_s:
                return (f"allows at most {format_duration(limits.max_walltime_s)} of walltime in "
                        f"{spec.access_mode.slug}")
            if reason := quota_why_not(spec.access_mode, limits.max_gpu_hours, limits.period_s, spec.gpus,
                                       spec.walltime_s):
                return reason
    if parts and spec.cpus > max(p.max_cpus for p in parts):
        return f"runs jobs of at most {max(p.max_cpus for p in parts)} CPUs"
    if not any(p.gpus_total >= spec.gpus for p in parts):
        return f"has at most {max(p.gpus_total for p in parts)} GPUs in a partition"
    if not any(p.gpus_total >= spec.gpus and p.max_walltime_s >= spec.walltime_s for p in parts):
        longest = max(p.max_walltime_s for p in parts if p.gpus_total >= spec.gpus)
        return f"allows at most {format_duration(longest)} of walltime for {spec.gpus} GPUs"
    return ""


def maintenance_in_the_way(advert: jobs_pb2.Advert, walltime_s: int, now: float | None = None) -> str:
    """The hub's announced maintenance a job starting now would run into, described; "" if none."""
    now = time.time() if now is None else now
    for window in advert.maintenance:
        start, end = window.start.ToNanoseconds() / 1e9, window.end.ToNanoseconds() / 1e9
        if start < now + walltime_s and now < end:
            return (f"has maintenance from {time.strftime('%Y-%m-%d %H:%M', time.gmtime(start))} to "
                    f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(end))}"
                    + (f" ({window.reason})" if window.reason else "") + " that the job would run into")
    return ""


def rank(verdicts: list[Verdict], free_gpus: dict[str, int], specialised: frozenset[str] = frozenset()
         ) -> list[Verdict]:
    """Sites that fit and gave an estimate: those specialised in the job's sector first, then earliest start;
    ties go to the most free GPUs, then name."""
    usable = [v for v in verdicts if v.fits and v.wait_s is not None]
    return sorted(usable, key=lambda v: (v.site not in specialised, round(v.wait_s or 0.0),
                                         -free_gpus.get(v.site, 0), v.site))
