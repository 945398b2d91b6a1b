"""federation.timefmt: Slurm-style durations in, Slurm-style durations out."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from federation.timefmt import format_duration, parse_duration

# Every format the error message must mention, so the user can see how to fix the input.
ACCEPTED_FORMATS = ("`30`", "`MM:SS`", "`HH:MM:SS`", "`D-HH`", "`D-HH:MM`", "`D-HH:MM:SS`", "`90s`", "`2h`")


@pytest.mark.parametrize("text, seconds", [
    ("30", 30 * 60),                     # MM: plain minutes, as in `sbatch -t 30`
    ("0", 0),
    ("90", 90 * 60),                     # minutes above 59 are fine
    ("5:30", 5 * 60 + 30),               # MM:SS
    ("01:02:03", 3600 + 2 * 60 + 3),     # HH:MM:SS
    ("1:2:3", 3600 + 2 * 60 + 3),        # without zero padding
    ("48:00:00", 48 * 3600),
    ("2-12", 2 * 86400 + 12 * 3600),     # D-HH
    ("1-02:30", 86400 + 2 * 3600 + 30 * 60),            # D-HH:MM
    ("1-00:00:00", 86400),                               # D-HH:MM:SS
    ("3-04:05:06", 3 * 86400 + 4 * 3600 + 5 * 60 + 6),
    ("90s", 90),
    ("10m", 600),
    ("2h", 7200),
    ("1d", 86400),
    ("0s", 0),
    ("  45  ", 45 * 60),                 # surrounding blanks are ignored
])
def test_parse_accepts_slurm_formats_and_suffixes(text, seconds):
    """Each Slurm format and each s/m/h/d suffix gives the right number of seconds."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("value", [0, 1, 59, 3600, 10 ** 9])
def test_parse_passes_non_negative_ints_through_as_seconds(value):
    """A plain int (from a config file) is already a number of seconds."""
    assert parse_duration(value) == value
    assert type(parse_duration(value)) is int


@pytest.mark.parametrize("text", ["", "   ", "abc", "1:2:3:4", "-5", "1-", "1.5", "1-2:3:4:5", "5x", "h2",
                                  "1:-2", "1 2", ":30", "30:", "1-:30", "-1-00"])
def test_parse_rejects_malformed_text_and_lists_the_formats(text):
    """Malformed text raises ValueError quoting the input and listing every accepted format."""
    with pytest.raises(ValueError) as info:
        parse_duration(text)
    message = str(info.value)
    assert repr(text) in message
    for fmt in ACCEPTED_FORMATS:
        assert fmt in message, f"{fmt} missing from {message!r}"


@pytest.mark.parametrize("value", [True, False, -1, -5, -86400])
def test_parse_rejects_bools_and_negative_ints_and_lists_the_formats(value):
    """True/False are not durations and negative seconds are refused; the message says what is accepted."""
    with pytest.raises(ValueError) as info:
        parse_duration(value)
    message = str(info.value)
    assert str(value) in message
    for fmt in ACCEPTED_FORMATS:
        assert fmt in message, f"{fmt} missing from {message!r}"


@pytest.mark.parametrize("seconds, text", [
    (0, "00:00:00"), (59, "00:00:59"), (3600, "01:00:00"), (86399, "23:59:59"),
    (86400, "1-00:00:00"), (90061, "1-01:01:01"), (10 * 86400 + 5, "10-00:00:05"),
])
def test_format_prints_slurm_time_limits(seconds, text):
    """Below a day HH:MM:SS, from a day on D-HH:MM:SS, as Slurm prints time limits."""
    assert format_duration(seconds) == text


def test_format_clamps_negatives_and_truncates_fractions():
    """Negative values print as zero; fractions of a second are dropped."""
    assert format_duration(-5) == "00:00:00"
    assert format_duration(61.9) == "00:01:01"


@pytest.mark.parametrize("seconds", [*range(0, 200), 3599, 3600, 3601, 86399, 86400, 86401, 90061,
                                     7 * 86400 - 1, 366 * 86400, 1000 * 86400 + 12345])
def test_format_then_parse_round_trips(seconds):
    """Whatever format_duration prints, parse_duration reads back to the same number of seconds."""
    assert parse_duration(format_duration(seconds)) == seconds


@given(st.integers(min_value=0, max_value=10 ** 10))
def test_round_trip_property(seconds):
    """Round trip for any non-negative number of seconds, far beyond a day."""
    assert parse_duration(format_duration(seconds)) == seconds
