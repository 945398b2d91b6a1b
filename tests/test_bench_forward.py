"""`aifed bench forward`, small: the gRPC floor and the bare pipeline, then real daemons unbatched, batched and with
arrays, every figure printed."""

from __future__ import annotations

import sqlite3

import orjson

from federation.cli import main


def test_the_forward_benchmark_prints_its_figures_against_the_grpc_floor_and_the_bare_pipeline(capsys, tmp_path):
    assert main(["bench", "forward", "--seconds", "2", "--clients", "4", "--batch", "50", "--json",
                 "--keep", str(tmp_path / "bench")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = orjson.loads(out[-1])
    floor = result["grpc_floor"]
    assert floor["calls_per_s"] > 0 and floor["server_cpu_us_per_call"] > 0 and floor["clients"] == 4
    for name, per_call in (("unbatched", 1), ("batched", 50), ("arrays", 50)):
        r = result[name]
        for key in ("jobs_per_s", "forwarded_per_s", "p50_ms", "p99_ms", "antenna_cpu_us_per_job",
                    "hub_cpu_us_per_job"):
            assert r[key] > 0, (name, key)
        assert r["jobs_per_call"] == per_call and r["acknowledged"] % per_call == 0
        assert r["p50_ms"] <= r["p99_ms"]
    # One call per job: the unbatched run cannot outrun a server that does nothing.
    assert 0 < result["unbatched"]["of_grpc_floor"] < 1.5
    assert result["unbatched"]["of_grpc_floor"] == round(result["unbatched"]["jobs_per_s"] / floor["calls_per_s"], 3)
    assert "of_grpc_floor" not in result["batched"] and "of_grpc_floor" not in result["arrays"]
    # The bare pipeline forwarded what it acknowledged, through its own journals, and every run is compared with it.
    bare = result["bare_pipeline"]
    for name, per_call, clients in (("unbatched", 1, 4), ("batched", 50, 2)):
        b = bare[name]
        assert b["jobs_per_call"] == per_call and b["clients"] == clients
        for key in ("jobs_per_s", "forwarded_per_s", "antenna_cpu_us_per_job", "hub_cpu_us_per_job"):
            assert b[key] > 0, (name, key)
        bare_hub = sqlite3.connect(tmp_path / "bench" / f"bare-{name}" / "hub.sqlite")
        bare_antenna = sqlite3.connect(tmp_path / "bench" / f"bare-{name}" / "antenna.sqlite")
        held = bare_hub.execute("SELECT count(*), min(state), max(state) FROM jobs").fetchone()
        assert held[0] >= b["forwarded_per_s"] and held[1:] == (3, 3)  # QUEUED, as the hub journaled them
        assert bare_antenna.execute("SELECT count(*) FROM jobs").fetchone()[0] >= held[0]
        assert bare_antenna.execute("SELECT count(*) FROM jobs WHERE state = 3").fetchone()[0] > 0  # the feed, applied
        spec = orjson.loads(bare_hub.execute("SELECT record FROM jobs LIMIT 1").fetchone()[0])["spec"]
        assert spec["argv"] == ["true"] and spec["walltime_s"] == 60
    for name in ("unbatched", "batched", "arrays"):
        against = bare["unbatched" if name == "unbatched" else "batched"]["jobs_per_s"]
        assert result[name]["of_bare_pipeline"] == round(result[name]["jobs_per_s"] / against, 3)
    assert any(line.startswith("bare pipeline, ") for line in out)
    # The arrays run asked for arrays of 50 tasks: every job the hub holds from it is a task of one.
    tasks = sqlite3.connect(tmp_path / "bench" / "arrays" / "hub1" / "hub.sqlite").execute(
        "SELECT json_extract(record, '$.spec.array_job'), json_extract(record, '$.spec.array_task')"
        " FROM jobs").fetchall()
    arrays = {job for job, _ in tasks}
    assert "" not in arrays and len(tasks) == 50 * len(arrays) == result["arrays"]["acknowledged"]
    assert sorted(task for _, task in tasks) == sorted(list(range(50)) * len(arrays))
    batched = sqlite3.connect(tmp_path / "bench" / "batched" / "hub1" / "hub.sqlite").execute(
        "SELECT DISTINCT json_extract(record, '$.spec.array_job') FROM jobs").fetchall()
    assert batched == [("",)]
    assert any(line.startswith("gRPC floor:") for line in out)
