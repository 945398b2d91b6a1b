"""Read the `#SBATCH` directives of a user's existing Slurm batch script.

Like sbatch, directives are read from the top of the script until the first line that is neither blank nor a
comment. Those aifed understands become the job's request; `--output`/`--error` are not needed (aifed keeps
the job's stdout and stderr: `aifed logs`); anything else is reported, never silently dropped.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

from federation.timefmt import parse_duration

# option spellings -> request field
_FIELDS = {
    "-p": "partition", "--partition": "partition",
    "-t": "walltime_s", "--time": "walltime_s",
    "-c": "cpus", "--cpus-per-task": "cpus",
    "--mem": "memory_mb",
    "-J": "name", "--job-name": "name",
    "-A": "project", "--account": "project",
    "-G": "gpus", "--gpus": "gpus", "--gpus-per-node": "gpus", "--gres": "gpus",
    "-N": "nodes", "--nodes": "nodes", "-n": "ntasks", "--ntasks": "ntasks",
    "-a": "array", "--array": "array",
    "-o": "output", "--output": "output", "-e": "output", "--error": "output",
}
_GPUS = re.compile(r"^(?:gpu:)?(?:[A-Za-z0-9_.-]+:)?(\d+)$")


class DirectiveError(ValueError):
    """A directive aifed cannot honour; the message names the line."""


@dataclass
class Directives:
    values: dict[str, object] = field(default_factory=dict)   # request field -> value
    lines: dict[str, int] = field(default_factory=dict)       # request field -> line number
    notes: list[str] = field(default_factory=list)            # what was ignored, and why


def parse_memory_mb(text: str) -> int:
    """Slurm's --mem: megabytes, or with a K/M/G/T suffix."""
    m = re.fullmatch(r"(\d+)([KMGT]?)B?", text.strip().upper())
    if not m:
        raise ValueError(f"{text!r} is not a size: use megabytes (4096) or a suffix (4G, 512M)")
    value, unit = int(m.group(1)), m.group(2) or "M"
    return {"K": -(-value // 1024), "M": value, "G": value * 1024, "T": value * 1024 ** 2}[unit]


def _gpus(text: str) -> int:
    if text.strip() == "gpu":
        return 1  # --gres=gpu means one GPU
    parts = [p for p in text.split(",") if p.startswith("gpu") or p[:1].isdigit()]
    total = 0
    for p in parts or [text]:
        m = _GPUS.match(p)
        if not m:
            raise ValueError(f"{text!r} is not a GPU count (use N, gpu:N or gpu:TYPE:N)")
        total += int(m.group(1))
    return total


MAX_ARRAY_TASKS = 10_000
_RANGE = re.compile(r"^(\d+)(?:-(\d+)(?::(\d+))?)?$")


def parse_array(text: str, limit: int = MAX_ARRAY_TASKS) -> list[int]:
    """sbatch's --array indices: `0-999`, `1,3,5-7`, `0-98:2`. A `%N` throttle is not supported."""
    if "%" in text:
        raise ValueError("a %N throttle is not supported: the hub's scheduler decides how many run at once")
    indices: list[int] = []
    for part in text.split(","):
        m = _RANGE.fullmatch(part.strip())
        if not m:
            raise ValueError(f"{part!r} is not an index, a range (0-9) or a stepped range (0-98:2)")
        first = int(m.group(1))
        last = int(m.group(2)) if m.group(2) is not None else first
        step = int(m.group(3) or 1)
        if last < first or step < 1:
            raise ValueError(f"{part!r} is an empty range")
        if last > 4_000_000:
            raise ValueError(f"index {last} is larger than 4000000")
        if len(indices) + (last - first) // step + 1 > limit:
            raise ValueError(f"more than {limit} tasks")
        indices.extend(range(first, last + 1, step))
    if len(set(indices)) != len(indices):
        raise ValueError("an index is listed twice")
    return indices


def parse(script: str) -> Directives:
    out = Directives()
    for number, line in enumerate(script.splitlines(), start=1):
        stripped = line.strip()
        if number == 1 and stripped.startswith("#!"):
            continue
        if stripped and not stripped.startswith("#"):
            break
        if not line.startswith("#SBATCH"):  # like sbatch: only at the start of the line
            continue
        try:
            words = shlex.split(stripped[len("#SBATCH"):], comments=True)
        except ValueError as exc:
            raise DirectiveError(f"line {number}: cannot read {stripped!r}: {exc}") from None
        i = 0
        while i < len(words):
            word = words[i]
            option, eq, value = word.partition("=")
            if not word.startswith("--") and len(word) > 2 and word[:2] in _FIELDS:
                option, eq, value = word[:2], "=", word[2:]  # -c4, -pgpu: the value written against the option
            if option not in _FIELDS:
                out.notes.append(f"line {number}: #SBATCH {word} is not supported by aifed and is ignored")
                i += 1
                continue
            if not eq:
                if i + 1 >= len(words):
                    raise DirectiveError(f"line {number}: #SBATCH {option} needs a value")
                value = words[i + 1]
                i += 1
            i += 1
            _take(out, _FIELDS[option], option, value, number)
    return out


def _take(out: Directives, name: str, option: str, value: str, number: int) -> None:
    where = f"line {number}: #SBATCH {option}"
    try:
        if name == "output":
            out.notes.append(f"{where} is ignored: aifed keeps the job's stdout and stderr (see `aifed logs`)")
            return
        if name in ("nodes", "ntasks"):
            if value.strip() not in ("1", "1-1"):
                raise DirectiveError(f"{where}={value}: aifed runs single-node, single-task jobs")
            return
        if name == "gpus" and option == "--gres" and not value.startswith("gpu"):
            out.notes.append(f"{where}={value} is not a GPU request and is ignored")
            return
        if name == "array":
            parse_array(value)  # checked now; the antenna expands it
        parsed: object = {
            "walltime_s": parse_duration, "cpus": int, "memory_mb": parse_memory_mb, "gpus": _gpus,
        }.get(name, str)(value)
    except DirectiveError:
        raise
    except ValueError as exc:
        raise DirectiveError(f"{where}: {exc}") from None
    if name in out.values and out.values[name] != parsed:
        raise DirectiveError(f"{where}={value} contradicts line {out.lines[name]}")
    out.values[name] = parsed
    out.lines[name] = number
