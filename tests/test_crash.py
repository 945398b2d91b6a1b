"""The crash harness, small: daemons SIGKILLed during a burst lose no acknowledged job and run none twice.
The full run (10,000 jobs, 20 kills) is `aifed bench crash`; see docs/benchmarks.md."""

from __future__ import annotations

import pytest

from federation.crash import crash_run


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("seed", [7, 11])
async def test_sigkill_during_a_burst_loses_nothing_and_runs_nothing_twice(tmp_path, seed):
    result = await crash_run(tmp_path, jobs=400, kills=4, seed=seed, batch=10)
    assert result["acknowledged"] == 400
    assert result["lost"] == 0, result["lost_ids"]
    assert result["duplicated"] == 0, result["duplicated_ids"]
    assert result["unfinished"] == 0, result["unfinished_ids"]
    # every acknowledged job ran exactly once, except one a hub honestly reports LOST (killed as it launched it)
    assert result["ran"] + result["reported_lost"] == 400
