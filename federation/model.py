"""The job model every part of aifed speaks. Protobuf stays at the edge (`federation.convert`)."""

from __future__ import annotations

import enum
import re
import time
from dataclasses import MISSING, dataclass, field, fields
from typing import TypeVar

from federation.errors import InvalidArgument

T = TypeVar("T")


def record(cls: type[T]) -> type[T]:
    """`@dataclass(frozen=True)` with a faster `__init__`, for the job model's classes, which daemons build
    thousands of times a second (every journal read, every message).

    A frozen dataclass's own `__init__` sets each field through `object.__setattr__`, a call per field: 4.6 µs
    for a `Job` or a `JobSpec` here. This one takes the same arguments, with the same defaults, and stores them
    straight into the instance's `__dict__` (2.1 µs for a `JobSpec`, 2.5 for a `Job`). The class is otherwise
    the dataclass, frozen: its fields cannot be assigned, and equality, hashing and `repr` are the dataclass's
    own. Not for classes with `__post_init__`, `InitVar`s or fields left out of `__init__`."""
    cls = dataclass(frozen=True)(cls)
    if hasattr(cls, "__post_init__"):
        raise TypeError(f"{cls.__name__} has __post_init__, which record() would skip")
    params, body, scope = [], [], {}
    for f in fields(cls):
        if not f.init or f.kw_only:
            raise TypeError(f"{cls.__name__}.{f.name}: record() takes only plain init fields")
        if f.default is not MISSING:
            scope[f"_d_{f.name}"] = f.default
            params.append(f"{f.name}=_d_{f.name}")
        elif f.default_factory is not MISSING:
            scope[f"_f_{f.name}"] = f.default_factory
            params.append(f"{f.name}=_NO_VALUE")
            body.append(f"    if {f.name} is _NO_VALUE: {f.name} = _f_{f.name}()")
        else:
            params.append(f.name)
        body.append(f"    d[{f.name!r}] = {f.name}")
    scope["_NO_VALUE"] = object()
    source = f"def __init__(self, {', '.join(params)}):\n    d = self.__dict__\n" + "\n".join(body) + "\n"
    exec(source, scope)  # noqa: S102 - built from the class's own field names only
    init = scope["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    cls.__init__ = init
    return cls


class JobState(enum.IntEnum):
    """Where a federated job is. Values match `aifed.v1.JobState`."""

    PENDING = 1     #: accepted and journaled by the antenna, not yet at a hub
    FORWARDED = 2   #: a hub acknowledged it and journaled it
    QUEUED = 3      #: waiting in the hub's scheduler for resources
    RUNNING = 4     #: started by the hub's scheduler
    COMPLETED = 5   #: ended with exit code 0
    FAILED = 6      #: ended with a non-zero exit code, or could not be started or placed
    CANCELLED = 7   #: cancelled by its owner
    TIMEOUT = 8     #: killed when it reached its walltime
    LOST = 9        #: the hub lost track of it: its outcome is unknown
    UNKNOWN = 10    #: the scheduler reports a state aifed does not know; still followed
    MOVING = 11     #: the hub is handing it to a peer hub (`moved_to`) that would start it sooner
    MOVED = 12      #: final at the hub that handed it on; the antenna follows the job to `moved_to`

    @property
    def final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED, JobState.TIMEOUT, JobState.LOST,
                          JobState.MOVED})


class AccessMode(enum.IntEnum):
    """EuroHPC AI Factory access modes. Values match `aifed.v1.AccessMode`."""

    UNSPECIFIED = 0
    PLAYGROUND = 1
    FAST_LANE = 2
    LARGE_SCALE = 3
    AI_FOR_SCIENCE = 4

    @property
    def slug(self) -> str:
        return self.name.lower().replace("_", "-")

    @classmethod
    def from_slug(cls, text: str) -> "AccessMode":
        for mode in cls:
            if mode.slug == text.strip().lower().replace("_", "-") and mode is not cls.UNSPECIFIED:
                return mode
        choices = ", ".join(m.slug for m in cls if m is not cls.UNSPECIFIED)
        raise ValueError(f"unknown access mode {text!r}; choose one of {choices}")


_ACCESS_MODES = frozenset(AccessMode)

# Bounds that no real AI Factory job exceeds; beyond them a value is a typo or an attack.
MAX_GPUS = 100_000
MAX_CPUS = 1_000_000
MAX_MEMORY_MB = 1 << 40
MAX_WALLTIME_S = 366 * 86400
MAX_ARGV = 4096
MAX_SCRIPT_BYTES = 1 << 20
MAX_ENV = 1024
MAX_ARRAY_INDEX = 4_000_000  # Slurm's own limit on an array index
# Set by the scheduler or aifed; a user's SBATCH_* would even change how sbatch submits the job.
RESERVED_ENV_PREFIXES = ("SLURM_", "SBATCH_", "SALLOC_", "SRUN_", "AIFED_")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NAME = re.compile(r"^[\w.+-]{0,128}$")
_SECTOR = re.compile(r"[a-z0-9][a-z0-9-]{0,39}")
_SITE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
MAX_SITE_CHOICES = 16
_COUNTRY = re.compile(r"[A-Z]{2}")
MAX_INPUTS = 1000                 # input files of one job
MAX_OUTPUTS = 100                 # output paths a job declares
MAX_INPUT_NAME = 1024             # characters of an input's path in the job's working directory
MAX_JOB_INPUT_BYTES = 100 << 30   # all of one job's inputs together
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_RESERVED_INPUT_NAMES = {"stdout", "stderr", "script", "job.sh", "job.env", "exit", "exit.tmp", "launched",
                         "cancelled", "submitting", ".aifed-launch.sh",
                         ".aifed-slurm-job-id"}  # files the backends keep in a job's folder


def check_input_name(name: str, kind: str = "input") -> str:
    """An input's path inside the job's working directory, or InvalidArgument saying what is wrong with it:
    relative, normalised, no '..', no control characters, not one of the files aifed keeps there."""
    shown = repr(name[:80])
    if not name or len(name) > MAX_INPUT_NAME:
        raise InvalidArgument(f"{kind} name {shown} must be 1 to {MAX_INPUT_NAME} characters")
    if any(ord(c) < 0x20 or c in "\x7f\\" for c in name):
        raise InvalidArgument(f"{kind} name {shown} contains a control character or a backslash")
    if name.startswith("/"):
        raise InvalidArgument(f"{kind} name {shown} is an absolute path; it must be relative to the job's "
                              "working directory")
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise InvalidArgument(f"{kind} name {shown} must be a plain relative path: no '..', '.' or empty parts")
    if any(len(part.encode()) > 255 for part in parts):
        raise InvalidArgument(f"{kind} name {shown} has a part longer than 255 bytes")
    if parts[0] in _RESERVED_INPUT_NAMES:
        raise InvalidArgument(f"{kind} name {shown} is taken by a file aifed keeps in the job's folder")
    return name


@record
class InputFile:
    """One input of a job: its path in the working directory, and its content by SHA-256."""

    name: str
    sha256: str
    size: int
    residency: tuple[str, ...] = ()  # data residency: countries ("IT") or sites ("leonardo") it may go to

    def allows(self, site: str, location: str) -> bool:
        """Whether this input may go to hub `site`, located in country `location` ("" if it declares none)."""
        return not self.residency or site in self.residency or (bool(location) and location in self.residency)
_ARRAY_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,62}[a-z0-9]-[a-z0-9]{1,64}")  # a job id


@record
class JobSpec:
    """What a user asks to run: a command (argv) or a script, and the resources it needs."""

    argv: tuple[str, ...] = ()
    script: str = ""
    script_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    name: str = ""
    gpus: int = 0
    cpus: int = 1
    memory_mb: int = 0
    walltime_s: int = 3600
    partition: str = ""
    access_mode: AccessMode = AccessMode.UNSPECIFIED
    project: str = ""
    site: str = ""
    array_job: str = ""   # set by the antenna for the tasks of a job array: the array's id
    array_task: int = 0   # and this task's index
    sector: str = ""      # strategic sector (health, climate...): specialised hubs are preferred
    sector_required: bool = False  # only hubs specialised in `sector`
    prefer: tuple[str, ...] = ()   # hubs the user prefers, in order (placement takes the first that would start
    overflow_after_s: int = 3600   # the job within this long; else the policy chooses among all)
    exclude: tuple[str, ...] = ()  # hubs the job must never go to
    inputs: tuple[InputFile, ...] = ()  # files staged into the job's working directory before it starts
    outputs: tuple[str, ...] = ()  # paths in the working directory collected when the job ends (aifed fetch)

    def residency(self) -> tuple[tuple[str, ...], ...]:
        """The data-residency sets of the job's inputs (a key for grouping jobs the filters judge alike)."""
        return tuple(sorted({f.residency for f in self.inputs if f.residency}))

    @property
    def input_bytes(self) -> int:
        return sum(f.size for f in self.inputs)

    def array_env(self) -> dict[str, str]:
        """What a task of a job array finds in its environment (also under Slurm's names, so that existing
        array scripts work unchanged); empty for a job that is not in an array."""
        if not self.array_job:
            return {}
        task = str(self.array_task)
        return {"AIFED_ARRAY_JOB_ID": self.array_job, "AIFED_ARRAY_TASK_ID": task,
                "SLURM_ARRAY_JOB_ID": self.array_job, "SLURM_ARRAY_TASK_ID": task}

    def validate(self) -> None:
        """Raise InvalidArgument naming the field and what to fix. Checks only what needs no site."""
        if self.argv and self.script:
            raise InvalidArgument("give either a command or a script, not both")
        if not self.argv and not self.script.strip():
            raise InvalidArgument("the job has no command: give a command after `--` or a script file")
        if self.argv and not self.argv[0].strip():
            raise InvalidArgument("the command is empty: its first word must name a program")
        if len(self.argv) + len(self.script_args) > MAX_ARGV:
            raise InvalidArgument(f"too many arguments ({len(self.argv) + len(self.script_args)}); at most {MAX_ARGV}")
        if "\x00" in "".join(self.argv) or "\x00" in "".join(self.script_args):
            raise InvalidArgument("an argument contains a NUL byte")
        if len(self.script.encode()) > MAX_SCRIPT_BYTES:
            raise InvalidArgument(f"the script is larger than {MAX_SCRIPT_BYTES} bytes")
        if "\x00" in self.script:
            raise InvalidArgument("the script contains a NUL byte; is it a binary file?")
        if len(self.env) > MAX_ENV:
            raise InvalidArgument(f"too many environment variables ({len(self.env)}); at most {MAX_ENV}")
        for key, value in self.env.items():
            if not _ENV_NAME.fullmatch(key):
                raise InvalidArgument(f"environment variable name {key!r} is not valid: use letters, digits and _")
            if key.upper().startswith(RESERVED_ENV_PREFIXES):
                raise InvalidArgument(f"environment variable {key} is reserved (names starting with "
                                      f"{', '.join(RESERVED_ENV_PREFIXES)} are set by the scheduler or aifed)")
            if "\x00" in value:
                raise InvalidArgument(f"environment variable {key} contains a NUL byte")
        if not _NAME.fullmatch(self.name):
            raise InvalidArgument(
                f"job name {self.name!r} is not valid: at most 128 letters, digits, and . _ + -")
        _bounded("gpus", self.gpus, 0, MAX_GPUS)
        _bounded("cpus", self.cpus, 1, MAX_CPUS)
        _bounded("memory_mb", self.memory_mb, 0, MAX_MEMORY_MB)
        _bounded("walltime", self.walltime_s, 1, MAX_WALLTIME_S)
        _bounded("array task", self.array_task, 0, MAX_ARRAY_INDEX)
        if self.array_task and not self.array_job:
            raise InvalidArgument("an array task index without an array id")
        if self.sector and not _SECTOR.fullmatch(self.sector):
            raise InvalidArgument(f"sector {self.sector[:80]!r} is not valid: lower-case letters, digits and '-', "
                                  "such as health, climate, public-sector")
        if self.sector_required and not self.sector:
            raise InvalidArgument("a required sector needs a sector")
        _check_sites(self)
        _check_inputs(self.inputs)
        if len(self.outputs) > MAX_OUTPUTS:
            raise InvalidArgument(f"at most {MAX_OUTPUTS} output paths per job, not {len(self.outputs)}")
        for name in self.outputs:
            check_input_name(name, "output")
        if self.array_job and not _ARRAY_ID.fullmatch(self.array_job):
            raise InvalidArgument(f"array id {self.array_job[:80]!r} is not valid")
        if self.access_mode not in _ACCESS_MODES:
            raise InvalidArgument(f"unknown access mode {self.access_mode}")


def _check_inputs(inputs: tuple[InputFile, ...]) -> None:
    if not inputs:
        return
    if len(inputs) > MAX_INPUTS:
        raise InvalidArgument(f"at most {MAX_INPUTS} input files per job, not {len(inputs)}")
    names: set[str] = set()
    for f in inputs:
        check_input_name(f.name)
        if not SHA256_HEX.fullmatch(f.sha256):
            raise InvalidArgument(f"input {f.name!r}: its SHA-256 must be 64 lower-case hex digits")
        if f.name in names:
            raise InvalidArgument(f"input {f.name!r} is given twice")
        if len(f.residency) > MAX_SITE_CHOICES * 2:
            raise InvalidArgument(f"input {f.name!r}: at most {MAX_SITE_CHOICES * 2} countries or sites it may go to")
        for place in f.residency:
            if not (_COUNTRY.fullmatch(place) or _SITE.fullmatch(place)):
                raise InvalidArgument(f"input {f.name!r}: {place[:40]!r} is neither a country (ISO 3166 alpha-2, "
                                      "such as IT) nor a site name (such as leonardo)")
        names.add(f.name)
    for name in names:  # "a" and "a/b" cannot both be files
        parts = name.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in names:
                raise InvalidArgument(f"input {'/'.join(parts[:i])!r} is a file, and also a folder of {name!r}")
    total = sum(f.size for f in inputs)
    if total > MAX_JOB_INPUT_BYTES:
        raise InvalidArgument(f"the job's inputs come to {total} bytes; at most {MAX_JOB_INPUT_BYTES} per job")


def _check_sites(spec: JobSpec) -> None:
    if spec.prefer or spec.exclude:
        _check_site_choices(spec)
    _bounded("overflow_after", spec.overflow_after_s, 0, MAX_WALLTIME_S)


def _check_site_choices(spec: JobSpec) -> None:
    for name, sites in (("preferred", spec.prefer), ("excluded", spec.exclude)):
        if len(sites) > MAX_SITE_CHOICES:
            raise InvalidArgument(f"at most {MAX_SITE_CHOICES} {name} sites, not {len(sites)}")
        for site in sites:
            if not _SITE.fullmatch(site):
                raise InvalidArgument(f"{name} site {site[:80]!r} is not a site name (lower-case letters, digits, "
                                      "'-')")
        if len(set(sites)) != len(sites):
            raise InvalidArgument(f"a site is listed twice among the {name} sites")
    if both := sorted(set(spec.prefer) & set(spec.exclude)):
        raise InvalidArgument(f"site {both[0]} is both preferred and excluded")
    if spec.site:
        raise InvalidArgument("a job pinned to a site (--site) takes no preferred or excluded sites")



_FIELDS: dict[type, frozenset[str]] = {}


def evolve(obj: T, **changes) -> T:
    """`dataclasses.replace` for the model's frozen dataclasses (none has `__post_init__`): a copy with
    `changes`, made by copying the instance's attributes rather than calling `__init__` with every field.
    A job changes state thousands of times a second at a busy daemon, and `replace` cost 9 µs a copy, this 1.6.
    An unknown field is a TypeError, as with `replace`."""
    cls = type(obj)
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = frozenset(f.name for f in fields(cls))
    if not changes.keys() <= names:
        raise TypeError(f"{cls.__name__} has no field {sorted(changes.keys() - names)[0]!r}")
    new = object.__new__(cls)
    attributes = new.__dict__
    attributes.update(obj.__dict__)
    attributes.update(changes)
    return new


def _bounded(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise InvalidArgument(f"{name} must be between {low} and {high}, not {value}")


@record
class Transition:
    state: JobState
    at: float
    reason: str = ""


@record
class Job:
    """A federated job as journaled by an antenna or a hub."""

    id: str
    spec: JobSpec
    state: JobState
    owner: str = ""
    antenna: str = ""
    site: str = ""
    partition: str = ""
    exit_code: int | None = None
    reason: str = ""
    history: tuple[Transition, ...] = ()
    created_at: float = 0.0
    updated_at: float = 0.0
    account: str = ""  # at a hub with a user map: the local account the job runs as
    country: str = ""  # the submitting user's country (ISO 3166 alpha-2), as the antenna vouches
    # Hub-to-hub load balancing, one hop at most: the hubs the antenna allows the job to be moved to (those that
    # passed its filters), the hub that handed it here, and (MOVING, MOVED) the hub it is handed to.
    alternatives: tuple[str, ...] = ()
    moved_from: str = ""
    moved_to: str = ""

    @property
    def final(self) -> bool:
        return self.state.final

    def moved(self, state: JobState, reason: str = "", *, at: float | None = None, **changes) -> "Job":
        """A copy in `state`, with the transition recorded. Same state: only the other changes apply."""
        now = time.time() if at is None else at
        if state == self.state:
            return evolve(self, updated_at=now, **changes) if changes else self
        history = (*self.history, Transition(state, now, reason))
        return evolve(self, state=state, reason=reason, history=history, updated_at=now, **changes)
