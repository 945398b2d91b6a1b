"""`aifed bench forward`, small: the gRPC floor, then real daemons unbatched and batched, every figure printed."""

from __future__ import annotations

import sqlite3

import orjson

from federation.cli import main


def test_the_forward_benchmark_prints_its_figures_against_the_grpc_floor(capsys, tmp_path):
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
