"""`aifed bench journal`, small: two real journals, time-ordered and random job ids, every figure printed."""

from __future__ import annotations

import sqlite3

import orjson

from federation.cli import EXIT_USAGE, main
from federation.ids import token_time


def test_the_journal_benchmark_writes_both_kinds_of_ids_and_prints_per_tenth_figures(capsys, tmp_path):
    keep = tmp_path / "bench"
    assert main(["bench", "journal", "--jobs", "2000", "--batch", "100", "--json", "--keep", str(keep)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = orjson.loads(out[-1])
    assert result["jobs"] == 2000 and result["batch"] == 100
    for kind in ("time-ordered", "random"):
        r = result[kind]
        assert len(r["tenths"]) == 10 and r["first_tenth"] == r["tenths"][0] and r["last_tenth"] == r["tenths"][-1]
        assert all(t["cpu_us_per_job"] > 0 and t["wall_us_per_job"] > 0 for t in r["tenths"])
        assert r["journal_mb"] > 0
        # Every job was journaled and then moved on, durably.
        with sqlite3.connect(keep / f"{kind}.db") as db:
            rows = db.execute("SELECT id, idempotency_key, state FROM jobs ORDER BY rowid").fetchall()
        assert len(rows) == 2000 and all(key == job_id for job_id, key, _ in rows)
        assert {state for _, _, state in rows} == {2}  # FORWARDED
        ids = [job_id for job_id, _, _ in rows]
        if kind == "time-ordered":
            assert ids == sorted(ids) and abs(token_time(ids[-1].rpartition("-")[2]) - token_time(
                ids[0].rpartition("-")[2])) < 600
        else:
            assert ids != sorted(ids)  # 2,000 random ids in order: no chance
    assert result["last_tenth_cpu_ratio"] == round(
        result["time-ordered"]["last_tenth"]["cpu_us_per_job"] / result["random"]["last_tenth"]["cpu_us_per_job"], 3)
    assert any("time-ordered over random" in line for line in out)


def test_too_few_batches_are_refused(capsys):
    assert main(["bench", "journal", "--jobs", "900", "--batch", "100"]) == EXIT_USAGE
    assert "give at least ten batches" in capsys.readouterr().err
