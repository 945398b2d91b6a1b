"""EuroHPC allocations: GPU-hour budgets per project, with dates, enforced by the antenna.

An allocations file (`antenna.allocations`) holds `[[allocation]]` tables:

    [[allocation]]
    project = "ai-health-2026"
    gpu_hours = 5000
    start = 2026-09-01T00:00:00Z
    end = 2027-02-28T23:59:59Z
    modes = ["large-scale", "ai-for-science"]   # optional; empty: any mode
    hub = "leonardo"                            # optional; absent: federation-wide

The same file may say where projects and users are from, and who may charge a project:

    [[project]]
    name = "ai-health-2026"
    country = "SI"                  # eligibility: the country hubs check (before the user's, then the antenna's)
    members = ["ana", "bojan"]      # optional: only these users of this antenna may submit under it

    [[user]]
    name = "marta"
    country = "HR"

The rules (docs/access-policy.md#allocations):
- Large Scale and AI for Science jobs need an allocation of their project that grants their mode and is valid now.
- A job is charged to the allocation that matches it (its project, its mode, its submission time within the
  window; a hub-specific allocation only for a job pinned to that hub). A Large Scale or AI for Science job that
  only hub-specific allocations match is pinned to the hub of the first of them with room.
- A job reserves GPUs x walltime until it ends, then is charged GPUs x its real runtime (RUNNING to its final
  state; nothing if it never ran). A job that asks for more than is left, or whose walltime would run past the
  allocation's end, is refused.

`Allocations` keeps the usage of every allocation in memory, built from the journal at start and kept up to date
from each published job change, so a submission's check costs O(1) whatever the journal holds. The check that
reserves is made inside the journal transaction that stores the job (`reserve`), so two submissions racing for
the last GPU-hours cannot both pass.
"""

from __future__ import annotations

import datetime as dt
import math
import threading
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from federation.config import country_code, read_toml
from federation.errors import ConfigError, FailedPrecondition, PermissionDenied
from federation.identity import Identity, Role, check_site_name, check_user_name
from federation.model import AccessMode, Job, JobSpec, JobState

REQUIRED = (AccessMode.LARGE_SCALE, AccessMode.AI_FOR_SCIENCE)  # modes that need an approved allocation
KEYS = ("project", "gpu_hours", "start", "end", "modes", "hub")
PROJECT_KEYS = ("name", "country", "members")
USER_KEYS = ("name", "country")
MAX_GPU_HOURS = 1e12
EPSILON_S = 1e-6  # GPU-seconds: float sums of real runtimes must not refuse an exact fit


@dataclass(frozen=True)
class Allocation:
    """One approved budget: `gpu_hours` for `project` between `start` and `end` (Unix times, both included),
    for jobs of `modes` (empty: any), at `hub` ("" : any hub)."""

    index: int  # its place in the file: allocation[index]
    project: str
    gpu_hours: float
    start: float
    end: float
    modes: tuple[AccessMode, ...] = ()
    hub: str = ""

    @property
    def budget_s(self) -> float:
        return self.gpu_hours * 3600

    @property
    def window(self) -> str:
        return f"{instant(self.start)}..{instant(self.end)}"

    @property
    def where(self) -> str:
        return f"at hub {self.hub}" if self.hub else "federation-wide"

    def admits(self, mode: AccessMode) -> bool:
        return not self.modes or mode in self.modes

    def covers(self, at: float) -> bool:
        return self.start <= at <= self.end


@dataclass(frozen=True)
class Project:
    """A `[[project]]` table: where the project is from, and who may charge it (empty: any user here)."""

    name: str
    country: str = ""
    members: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Access:
    """Everything an allocations file says: budgets, projects and users."""

    allocations: tuple[Allocation, ...] = ()
    projects: tuple[Project, ...] = ()
    users: tuple[tuple[str, str], ...] = ()  # (user name, country)


def instant(t: float) -> str:
    """A Unix time as an ISO date and time in UTC, as allocations are written."""
    try:
        return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (ValueError, OverflowError, OSError):  # beyond year 9999 in UTC
        return f"{t:.0f} (Unix time)"


def hours(seconds: float) -> str:
    """GPU-seconds (or seconds) as hours, to 4 decimals without trailing zeros."""
    text = f"{seconds / 3600:.4f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


# -- loading ---------------------------------------------------------------------------------------

def _when(path: Path, key: str, value: object) -> float:
    if isinstance(value, str):
        try:
            value = dt.date.fromisoformat(value) if len(value) == 10 else dt.datetime.fromisoformat(value)
        except ValueError:
            raise ConfigError(path, key, f"{value!r} is not a date and time such as 2026-09-01T00:00:00Z") from None
    if isinstance(value, dt.date) and not isinstance(value, dt.datetime):  # a plain date: midnight UTC
        value = dt.datetime(value.year, value.month, value.day, tzinfo=dt.timezone.utc)
    if not isinstance(value, dt.datetime):
        raise ConfigError(path, key, f"must be a date and time such as 2026-09-01T00:00:00Z, not {value!r}")
    if value.tzinfo is None:
        raise ConfigError(path, key, "needs a time zone, such as 2026-09-01T00:00:00Z or +01:00")
    try:
        return value.timestamp()
    except (ValueError, OverflowError, OSError) as exc:
        raise ConfigError(path, key, f"{value.isoformat()} is out of range: {exc}") from None


def load(path: str | Path) -> Access:
    """Parse an allocations file; raise ConfigError naming the table and key that is wrong."""
    return parse(Path(path), read_toml(path, "allocations file"))


def _tables(path: Path, data: dict, name: str, keys: tuple[str, ...]) -> list[tuple[str, dict]]:
    raw = data.get(name, [])
    if not isinstance(raw, list):
        raise ConfigError(path, name, f"must be an array of tables: [[{name}]]")
    out = []
    for i, item in enumerate(raw):
        where = f"{name}[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(path, where, "must be a table")
        extra = sorted(set(item) - set(keys))
        if extra:
            raise ConfigError(path, f"{where}.{extra[0]}", "is not a known key (" + ", ".join(keys) + ")")
        out.append((where, item))
    return out


def _named(path: Path, where: str, item: dict, check) -> str:
    if "name" not in item:
        raise ConfigError(path, f"{where}.name", "is required")
    name = item["name"]
    try:
        if not isinstance(name, str):
            raise ValueError("must be a string")
        return check(name)
    except ValueError as exc:
        raise ConfigError(path, f"{where}.name", str(exc)) from None


def _country_of(path: Path, where: str, item: dict) -> str:
    value = item.get("country", "")
    try:
        if not isinstance(value, str):
            raise ValueError(f"must be an ISO 3166 alpha-2 country code such as SI, not {value!r}")
        return country_code(value) if value else ""
    except ValueError as exc:
        raise ConfigError(path, f"{where}.country", str(exc)) from None


def _project_name(name: str) -> str:
    if not name.strip() or len(name) > 128 or not name.isprintable():
        raise ValueError("must be a project name of 1-128 printable characters (as users give it with aifed "
                         "submit -A)")
    return name


def parse(path: Path, data: dict) -> Access:
    """What a parsed TOML document says (`load` without the reading)."""
    unknown = sorted(set(data) - {"allocation", "project", "user"})
    if unknown:
        raise ConfigError(path, unknown[0], "is not a known setting; an allocations file has [[allocation]], "
                                            "[[project]] and [[user]] tables only")
    projects: dict[str, Project] = {}
    for where, item in _tables(path, data, "project", PROJECT_KEYS):
        name = _named(path, where, item, _project_name)
        if name in projects:
            raise ConfigError(path, where, f"project {name} is described twice")
        members = item.get("members", [])
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise ConfigError(path, f"{where}.members", "must be a list of user names such as [\"ana\", \"bojan\"]")
        for m in members:
            try:
                check_user_name(m)
            except ValueError as exc:
                raise ConfigError(path, f"{where}.members", str(exc)) from None
        projects[name] = Project(name, _country_of(path, where, item), frozenset(members))
    users: dict[str, str] = {}
    for where, item in _tables(path, data, "user", USER_KEYS):
        name = _named(path, where, item, check_user_name)
        if name in users:
            raise ConfigError(path, where, f"user {name} is described twice")
        if "country" not in item:
            raise ConfigError(path, f"{where}.country", "is required")
        users[name] = _country_of(path, where, item)
    return Access(_allocations(path, data), tuple(projects.values()), tuple(sorted(users.items())))


def _allocations(path: Path, data: dict) -> tuple[Allocation, ...]:
    out: list[Allocation] = []
    for i, (where, item) in enumerate(_tables(path, data, "allocation", KEYS)):
        for key in ("project", "gpu_hours", "start", "end"):
            if key not in item:
                raise ConfigError(path, f"{where}.{key}", "is required")
        project = item["project"]
        try:
            if not isinstance(project, str):
                raise ValueError("must be a project name of 1-128 printable characters (as users give it with "
                                 "aifed submit -A)")
            _project_name(project)
        except ValueError as exc:
            raise ConfigError(path, f"{where}.project", str(exc)) from None
        budget = item["gpu_hours"]
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) \
                or not 0 < budget <= MAX_GPU_HOURS:
            raise ConfigError(path, f"{where}.gpu_hours", f"must be a number of GPU-hours above 0 (at most "
                                                          f"{MAX_GPU_HOURS:.0e}), not {budget!r}")
        start = _when(path, f"{where}.start", item["start"])
        end = _when(path, f"{where}.end", item["end"])
        if end <= start:
            raise ConfigError(path, f"{where}.end", f"must be after start ({instant(start)})")
        modes_raw = item.get("modes", [])
        if not isinstance(modes_raw, list) or not all(isinstance(m, str) for m in modes_raw):
            raise ConfigError(path, f"{where}.modes", "must be a list of access modes such as [\"large-scale\"]")
        modes: list[AccessMode] = []
        for m in modes_raw:
            try:
                mode = AccessMode.from_slug(m)
            except ValueError as exc:
                raise ConfigError(path, f"{where}.modes", str(exc)) from None
            if mode not in modes:
                modes.append(mode)
        hub = item.get("hub", "")
        if not isinstance(hub, str):
            raise ConfigError(path, f"{where}.hub", "must be a hub site name")
        if hub:
            try:
                check_site_name(hub)
            except ValueError as exc:
                raise ConfigError(path, f"{where}.hub", str(exc)) from None
        new = Allocation(i, project, float(budget), start, end, tuple(modes), hub)
        for old in out:
            if (old.project == new.project and old.hub == new.hub and old.start <= new.end and new.start <= old.end
                    and (not old.modes or not new.modes or set(old.modes) & set(new.modes))):
                raise ConfigError(path, where, f"overlaps allocation[{old.index}] (same project, "
                                  f"{'hub' if hub else 'federation-wide'}, access modes and dates): a job would "
                                  "not know which one to be charged to")
        out.append(new)
    return tuple(out)


def retention_s(retention: int, allocations: Iterable[Allocation]) -> int:
    """How long finished jobs must be kept: at least as long as the longest allocation lasts, or the charges of
    a running allocation would be forgotten when its old jobs are purged (0: kept for ever)."""
    longest = max((math.ceil(a.end - a.start) for a in allocations), default=0)
    return retention if retention == 0 else max(retention, longest)


# -- charging --------------------------------------------------------------------------------------

def runtime_s(job: Job) -> float:
    """How long a finished job ran: from its first RUNNING to its final state (0 if it never ran)."""
    began = next((t.at for t in job.history if t.state is JobState.RUNNING), None)
    ended = next((t.at for t in reversed(job.history) if t.state.final), None)
    if began is None or ended is None:
        return 0.0
    return max(0.0, ended - began)


def cost_s(job: Job) -> float:
    """GPU-seconds a job counts for: reserved (GPUs x walltime) until it ends, then charged (GPUs x runtime)."""
    if job.final:
        return job.spec.gpus * runtime_s(job)
    return float(job.spec.gpus * job.spec.walltime_s)


@dataclass(frozen=True)
class AllocationUsage:
    allocation: Allocation
    used_s: float       # charged: jobs that ended, by their real runtime
    reserved_s: float   # jobs not ended yet, by their walltime
    jobs: int           # jobs charged or reserved

    @property
    def remaining_s(self) -> float:
        return self.allocation.budget_s - self.used_s - self.reserved_s


@dataclass(frozen=True)
class UserUsage:
    project: str
    owner: str
    used_s: float
    reserved_s: float
    jobs: int


@dataclass
class _Totals:
    used_s: float = 0.0
    reserved_s: float = 0.0
    jobs: int = 0

    def add(self, amount: float, final: bool, sign: int) -> None:
        if final:
            self.used_s += sign * amount
        else:
            self.reserved_s += sign * amount
        self.jobs += sign


@dataclass(frozen=True)
class _Entry:
    allocation: int
    project: str
    owner: str
    amount: float
    final: bool


class Allocations:
    """The antenna's allocations and what each has used; safe to call from the journal's commit thread."""

    def __init__(self, access: Access | Iterable[Allocation] = (), antenna: str = ""):
        access = access if isinstance(access, Access) else Access(tuple(access))
        self.all = access.allocations
        self.projects = {p.name: p for p in access.projects}
        self.user_countries = dict(access.users)
        self.antenna = antenna
        self._by_project: dict[str, list[Allocation]] = defaultdict(list)
        for a in self.all:
            self._by_project[a.project].append(a)
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._jobs: dict[str, _Entry] = {}
        self._totals = [_Totals() for _ in self.all]
        self._users: dict[tuple[str, str], _Totals] = defaultdict(_Totals)
        self._members: dict[str, set[str]] = defaultdict(set)  # project -> owners of its jobs here

    def __bool__(self) -> bool:
        return bool(self.all)

    def rebuild(self, jobs: Iterable[Job]) -> None:
        """Usage from scratch, from every job in the journal."""
        with self._lock:
            self._reset()
            for job in jobs:
                self._observe(job)

    # -- who may charge a project, and where a job is from -----------------------------------------

    def check_member(self, spec: JobSpec, who: Identity) -> None:
        """Refuse a user who is not a member of a project that lists its members (operators may use any)."""
        project = self.projects.get(spec.project)
        if project is None or not project.members or who.role is Role.OPERATOR or who.name in project.members:
            return
        raise PermissionDenied(f"project {project.name} is open to its members only at antenna {self.antenna}, "
                               f"and {who.name or who.uri} is not one; ask the antenna's operator to add you "
                               "(members of [[project]] in the allocations file)")

    def country_of(self, spec: JobSpec, who: Identity, antenna_country: str) -> str:
        """The country a job is from, as hubs check it for eligibility: its project's if the allocations file
        gives one, else its user's, else the antenna's (`antenna.country`)."""
        project = self.projects.get(spec.project)
        if project is not None and project.country:
            return project.country
        own = self.user_countries.get(who.name, "") if who.role is Role.USER else ""
        return own or antenna_country

    # -- which allocation ----------------------------------------------------------------------------

    def select(self, spec: JobSpec, at: float) -> Allocation | None:
        """The allocation a job submitted at `at` is charged to: of its project, granting its mode, valid at
        `at`; a hub-specific one if the job is pinned to that hub, else the federation-wide one."""
        candidates = [a for a in self._by_project.get(spec.project, ()) if a.admits(spec.access_mode)
                      and a.covers(at)]
        if spec.site and (pinned := next((a for a in candidates if a.hub == spec.site), None)):
            return pinned
        return next((a for a in candidates if not a.hub), None)

    def assess(self, spec: JobSpec, now: float, tasks: int = 1) -> tuple[JobSpec, Allocation | None]:
        """Check a job (or an array of `tasks` jobs) against the allocations before it is stored: the spec to
        store (pinned to a hub if only a hub-specific allocation can pay for it) and the allocation it is
        charged to, or None. Raise FailedPrecondition saying why it is refused."""
        if not self.all and spec.access_mode not in REQUIRED:
            return spec, None
        chosen = self.select(spec, now)
        if chosen is None and not spec.site and spec.access_mode in REQUIRED:
            hubs = [a for a in self._by_project.get(spec.project, ()) if a.hub and a.admits(spec.access_mode)
                    and a.covers(now)]
            problems = [self.problem(a, spec, now, tasks) for a in hubs]
            fitting = [a for a, why in zip(hubs, problems) if not why]
            if hubs and not fitting:
                raise FailedPrecondition(problems[0])
            if fitting:
                return replace(spec, site=fitting[0].hub), fitting[0]
        if chosen is None:
            if spec.access_mode in REQUIRED:
                raise FailedPrecondition(self._none(spec, now))
            return spec, None
        if why := self.problem(chosen, spec, now, tasks):
            raise FailedPrecondition(why)
        return spec, chosen

    def problem(self, a: Allocation, spec: JobSpec, now: float, tasks: int = 1) -> str:
        """Why allocation `a` cannot pay for this job now ("" if it can): its walltime would run past the end, or
        it asks for more than is left."""
        if now + spec.walltime_s > a.end:
            return (f"this job would run past the allocation's end on {instant(a.end)} (project {a.project}, "
                    f"{a.window}{'' if not a.hub else f' at hub {a.hub}'}); at most {hours(max(0.0, a.end - now))} "
                    "hours of walltime left")
        with self._lock:
            return self._over(a, spec.gpus * spec.walltime_s * tasks, spec, tasks)

    def _over(self, a: Allocation, asked: float, spec: JobSpec, tasks: int) -> str:
        t = self._totals[a.index]
        left = a.budget_s - t.used_s - t.reserved_s
        if asked <= left + EPSILON_S:
            return ""
        what = "this array asks for" if tasks > 1 else "this job asks for"
        shape = f"{tasks} tasks × " if tasks > 1 else ""
        return (f"project {a.project} has {hours(max(0.0, left))} GPU-hours left of {hours(a.budget_s)} in "
                f"allocation {a.window}{'' if not a.hub else f' at hub {a.hub}'} ({hours(t.reserved_s)} reserved "
                f"by running or queued jobs); {what} {hours(asked)} ({shape}{spec.gpus} GPUs × "
                f"{hours(spec.walltime_s)} h)")

    def _none(self, spec: JobSpec, now: float) -> str:
        mode = spec.access_mode.slug
        need = f"{mode} jobs need an approved allocation"
        if not spec.project:
            return f"{need}: give the job's project (aifed submit -A PROJECT)"
        own = self._by_project.get(spec.project, [])
        if not own:
            return f"{need}, and project {spec.project} has none at antenna {self.antenna}"
        granting = [a for a in own if a.admits(spec.access_mode)]
        if not granting:
            grants = sorted({m.slug for a in own for m in a.modes})
            return f"{need}, and project {spec.project}'s allocations grant {', '.join(grants)} only"
        here = [a for a in granting if not a.hub or a.hub == spec.site]
        if not here:
            return (f"{need}, and project {spec.project}'s allocations for {mode} are for hub(s) "
                    f"{', '.join(sorted({a.hub for a in granting}))} only; this job is pinned to {spec.site}")
        later = sorted((a for a in here if a.start > now), key=lambda a: a.start)
        if later:
            return (f"{need} valid now, and project {spec.project}'s allocation {later[0].window} starts on "
                    f"{instant(later[0].start)}")
        ended = max(here, key=lambda a: a.end)
        return f"{need} valid now, and project {spec.project}'s allocation {ended.window} ended on {instant(ended.end)}"

    # -- usage -----------------------------------------------------------------------------------

    def reserve(self, a: Allocation, jobs: list[Job], spec: JobSpec) -> FailedPrecondition | None:
        """Reserve what these new jobs (one entry: a job or an array) ask of `a`, or say why not. Called inside
        the journal transaction that stores them: the check and the reservation are one step."""
        with self._lock:
            if why := self._over(a, sum(cost_s(j) for j in jobs), spec, len(jobs)):
                return FailedPrecondition(why)
            for job in jobs:
                self._observe(job)
        return None

    def release(self, job_ids: Iterable[str]) -> None:
        """Forget reservations of jobs whose transaction was undone."""
        with self._lock:
            for job_id in job_ids:
                self._drop(job_id)

    def observe(self, job: Job) -> None:
        """A job was stored or changed: count it where it belongs."""
        if job.spec.project in self._by_project:
            with self._lock:
                self._observe(job)

    def _observe(self, job: Job) -> None:
        project = job.spec.project
        if project not in self._by_project:
            return
        self._members[project].add(job.owner)
        old = self._jobs.get(job.id)
        if old is not None and old.final and not job.final:
            return  # a stale copy: a final state is never replaced by a live one
        a = self.select(job.spec, job.created_at)
        self._drop(job.id)
        if a is None:
            return
        entry = _Entry(a.index, project, job.owner, cost_s(job), job.final)
        self._jobs[job.id] = entry
        self._totals[a.index].add(entry.amount, entry.final, +1)
        self._users[(project, job.owner)].add(entry.amount, entry.final, +1)

    def _drop(self, job_id: str) -> None:
        old = self._jobs.pop(job_id, None)
        if old is not None:
            self._totals[old.allocation].add(old.amount, old.final, -1)
            self._users[(old.project, old.owner)].add(old.amount, old.final, -1)

    def usage(self, owner: str | None = None) -> tuple[list[AllocationUsage], list[UserUsage]]:
        """Every allocation's usage and each user's, per project; for `owner`, only the allocations of projects
        they have jobs under here, and only their own consumption."""
        with self._lock:
            visible = {p for p, owners in self._members.items() if owner is None or owner in owners}
            allocations = [AllocationUsage(a, t.used_s, t.reserved_s, t.jobs) for a, t in zip(self.all, self._totals)
                           if owner is None or a.project in visible]
            users = [UserUsage(project, who, t.used_s, t.reserved_s, t.jobs)
                     for (project, who), t in sorted(self._users.items())
                     if t.jobs and (owner is None or who == owner)]
        return allocations, users

    def describe(self, a: Allocation, spec: JobSpec, tasks: int = 1) -> str:
        """For a dry run: what is left of the allocation the job would be charged to."""
        with self._lock:
            t = self._totals[a.index]
            left = a.budget_s - t.used_s - t.reserved_s
        return (f"charged to project {a.project}'s allocation {a.window} {a.where}: {hours(max(0.0, left))} "
                f"GPU-hours left of {hours(a.budget_s)} ({hours(t.reserved_s)} reserved); this "
                f"{'array' if tasks > 1 else 'job'} asks for {hours(spec.gpus * spec.walltime_s * tasks)}")
