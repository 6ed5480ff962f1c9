"""No leaks: after ``close()`` nothing of gradprobe remains (``probe.close()``
removes every hook it installed and restores everything it patched), and a long run keeps
gradprobe's own memory bounded.

Each scenario of :data:`tests.robustness.harness.LEAK_SCENARIOS` compares the process before
and after: global module/optimizer hooks, every function gradprobe patches (by identity),
saved-tensors hooks, gradprobe threads, open file descriptors, SIGINT/SIGTERM handlers; per
object: module, parameter and optimizer hooks; and the model, optimizer, scaler (and the
probe itself) must be garbage-collectable once the user drops them (weak references).
"""

from __future__ import annotations

import pytest

from tests.robustness import harness as H


@pytest.mark.parametrize("scenario", sorted(H.LEAK_SCENARIOS))
def test_nothing_left_behind(tmp_path, scenario):
    problems = H.LEAK_SCENARIOS[scenario](str(tmp_path / scenario))
    assert not problems, problems


def test_bounded_buffers_over_a_short_run(tmp_path):
    """1,000 steps: the probe never holds more records than ``flush_steps`` between
    hand-overs, and the writer keeps up (its queue stays short)."""
    out = H.long_run(1_000, str(tmp_path), trace=False)
    assert out["max_pending_records"] <= out["flush_steps"]
    assert all(p["writer_queue"] < 50 for p in out["points"]), out["points"]
    assert all(p["sentinels"] <= 512 for p in out["points"])


#: growth allowed from 10% to 100% of the run. gradprobe's own traced allocations must not
#: grow with the step count (records are handed over and dropped); RSS includes the
#: allocator's slack (arenas, Arrow's memory pool), so it gets a looser bound: a leak of
#: even 100 bytes per step over 90,000 steps would be 9 MB.
MAX_GRADPROBE_GROWTH = 1 << 20
MAX_RSS_GROWTH = 32 << 20


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_long_run_keeps_memory_bounded(tmp_path):
    """100,000 steps of a tiny model: process RSS flat after warm-up, at most
    ``flush_steps`` records held between hand-overs."""
    out = H.long_run(100_000, str(tmp_path), trace=False)
    assert out["max_pending_records"] <= out["flush_steps"]
    assert out["rss_growth"] < MAX_RSS_GROWTH, out


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_long_run_gradprobe_allocations_bounded(tmp_path):
    """20,000 steps under ``tracemalloc`` (slow: it traces every allocation), counting only
    allocations made by gradprobe's own code."""
    out = H.long_run(20_000, str(tmp_path), trace=True)
    assert out["gradprobe_growth"] < MAX_GRADPROBE_GROWTH, out
    assert max(p["gradprobe_bytes"] for p in out["points"]) < 16 << 20, out
