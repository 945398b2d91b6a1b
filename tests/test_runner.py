"""The daemon runner's process settings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from federation.runner import GC_YOUNG_THRESHOLD

ROOT = Path(__file__).resolve().parent.parent

# Run in a process of its own: freezing the test runner's objects would change every later test.
PROBE = """
import gc, json, weakref
from federation.runner import tune_gc
class Node: pass
before = gc.get_threshold()
node = Node(); node.me = node; ref = weakref.ref(node); del node  # garbage only the cyclic collector frees
tune_gc()
print(json.dumps([before, gc.get_threshold(), gc.get_freeze_count(), ref() is None]))
"""


def test_a_started_daemon_collects_garbage_less_often_and_leaves_its_startup_objects_alone():
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    before, after, frozen, cycle_freed = json.loads(out)
    assert after == [GC_YOUNG_THRESHOLD, before[1], before[2]]  # the older generations keep Python's ratios
    assert GC_YOUNG_THRESHOLD > before[0]
    assert frozen > 1000  # the modules' objects, at least
    assert cycle_freed  # collected before freezing, not kept forever
