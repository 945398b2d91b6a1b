"""Durations in the formats Slurm users type: `MM`, `MM:SS`, `HH:MM:SS`, `D-HH`, `D-HH:MM`, `D-HH:MM:SS`.

Also accepted, for config files: a plain number of seconds as an int, and
`30s`, `10m`, `2h`, `1d` suffixes.
"""

from __future__ import annotations

import re

_SUFFIX = re.compile(r"^([0-9]{1,12})([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


_FORMATS = ("use minutes (`30`), `MM:SS`, `HH:MM:SS`, `D-HH`, `D-HH:MM`, `D-HH:MM:SS`, "
            "or a number with s/m/h/d (`90s`, `2h`)")


def parse_duration(text: str | int) -> int:
    """Return the duration in seconds, or raise ValueError saying which formats are accepted."""
    if isinstance(text, bool) or (isinstance(text, int) and text < 0):
        raise ValueError(f"{text!r} is not a duration: {_FORMATS}")
    if isinstance(text, int):
        return text
    s = str(text).strip()
    m = _SUFFIX.fullmatch(s)
    if m:
        return int(m.group(1)) * _UNITS[m.group(2)]
    try:
        days = 0
        if "-" in s:
            d, s = s.split("-", 1)
            days = _nonneg(d)
            parts = [_nonneg(p) for p in s.split(":")]
            if not 1 <= len(parts) <= 3:
                raise ValueError
            hours, minutes, seconds = (parts + [0, 0])[:3]
        else:
            parts = [_nonneg(p) for p in s.split(":")]
            if len(parts) == 1:
                hours, minutes, seconds = 0, parts[0], 0
            elif len(parts) == 2:
                hours, minutes, seconds = 0, parts[0], parts[1]
            elif len(parts) == 3:
                hours, minutes, seconds = parts
            else:
                raise ValueError
    except ValueError:
        raise ValueError(f"{text!r} is not a duration: {_FORMATS}") from None
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def _nonneg(part: str) -> int:
    if not (part.isascii() and part.isdigit()):
        raise ValueError(part)
    return int(part)


def format_duration(seconds: int | float) -> str:
    """Format seconds the way Slurm prints time limits: `D-HH:MM:SS` or `HH:MM:SS`."""
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    return f"{days}-{h:02d}:{m:02d}:{s:02d}" if days else f"{h:02d}:{m:02d}:{s:02d}"
