"""`aifed bench scale`, small: a hub journal filled with finished and active jobs, status queries timed against
the gRPC floor, and the hub's memory, every figure printed."""

from __future__ import annotations

import sqlite3

import orjson

from federation.cli import main


def test_the_scale_benchmark_fills_a_hub_and_times_its_status_queries_against_the_grpc_floor(capsys, tmp_path):
    assert main(["bench", "scale", "--finished", "3000", "--active", "300", "--queries", "200", "--json",
                 "--keep", str(tmp_path / "bench")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    r = orjson.loads(out[-1])
    assert (r["finished"], r["active"], r["queries"]) == (3000, 300, 200)
    for key in ("journal_mb", "hub_start_s", "status_p50_ms", "status_p99_ms", "grpc_floor_p50_ms",
                "grpc_floor_p99_ms", "hub_rss_mb", "hub_peak_rss_mb"):
        assert r[key] > 0, key
    assert r["status_p50_ms"] <= r["status_p99_ms"] and r["grpc_floor_p50_ms"] <= r["grpc_floor_p99_ms"]
    assert r["hub_rss_mb"] <= r["hub_peak_rss_mb"] < 500
    # The journal the hub answered from holds what was asked for: ended jobs, and active ones the hub took back.
    states = dict(sqlite3.connect(tmp_path / "bench" / "hub1" / "hub.sqlite").execute(
        "SELECT state, count(*) FROM jobs GROUP BY state").fetchall())
    assert states == {5: 3000, 3: 300}  # COMPLETED, QUEUED
    assert any(line.startswith("gRPC floor, the same number of calls") for line in out)
