"""The committed generated code matches the .proto contracts (run `make proto` after editing them)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _generator():
    spec = importlib.util.spec_from_file_location("generate", ROOT / "proto" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_has_not_drifted():
    diffs = _generator().drift()
    assert not diffs, "generated protobuf code differs from proto/: run `make proto`\n" + "".join(diffs)[:4000]


def test_drift_is_detected(tmp_path):
    """The check itself can fail: a tampered copy of the generated code is reported."""
    gen = _generator()
    for path in gen.OUT_DIR.iterdir():
        if path.is_file():
            (tmp_path / path.name).write_text(path.read_text())
    target = tmp_path / "jobs_pb2.py"
    target.write_text(target.read_text() + "\n# edited by hand\n")
    diffs = gen.drift(tmp_path)
    assert len(diffs) == 1 and "edited by hand" in diffs[0]


def test_generated_imports_are_package_relative():
    for path in (ROOT / "federation" / "pb").glob("*.py"):
        assert "from aifed.v1 import" not in path.read_text(), path
