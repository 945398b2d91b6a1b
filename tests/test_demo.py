"""`make demo` works: the whole federation as separate processes, driven through the CLI."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_and_every_job_ends_as_expected(tmp_path):
    res = subprocess.run([sys.executable, "-m", "federation.cli", "demo", "--dir", str(tmp_path / "demo")],
                         cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    for state in ("COMPLETED", "FAILED", "TIMEOUT", "CANCELLED"):
        assert state in out
    assert "refused (exit 7)" in out and "loss diverged" in out
    assert "Demo succeeded" in out
    assert out.count("stopped (exit 0)") == 5
    keys = list((tmp_path / "demo" / "pki").rglob("*.key"))
    assert keys and all(k.stat().st_mode & 0o777 == 0o600 for k in keys)
