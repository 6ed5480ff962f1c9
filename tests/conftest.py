"""Shared fixtures. The autouse fixture asserts that no gradprobe hook or patch survives a
test: every global patch is back to the original and no probe is left live."""

from __future__ import annotations

import os
import sys

import pytest
import torch

# tiny models run fastest on one intra-op thread, and the suite shares 2 cores with its own
# subprocesses (which inherit this)
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
# a finding that strays from its rule's declarations (severity, causes, final, evidence fields)
# raises in the tests instead of being printed as it is
os.environ.setdefault("GRADPROBE_STRICT_RULES", "1")


def _global_hook_counts() -> tuple[int, int, int, int]:
    from torch.nn.modules import module as m
    from torch.optim import optimizer as o

    return (
        len(m._global_forward_pre_hooks),
        len(m._global_forward_hooks),
        len(o._global_optimizer_pre_hooks),
        len(o._global_optimizer_post_hooks),
    )


@pytest.fixture(autouse=True)
def no_leaked_hooks():
    import torch.nn.functional as F

    from gradprobe.probe import patches
    from gradprobe.probe.core import live_probes

    before = _global_hook_counts()
    originals = (torch.autograd.backward, F.mse_loss, F.cross_entropy, torch.amp.GradScaler.update, torch.optim.Optimizer.__init__)
    yield
    for p in live_probes():
        p.close()
        pytest.fail(f"a probe was left open: {p!r}")
    assert not patches.installed_patches(), f"patches left installed: {list(patches.installed_patches())}"
    assert not patches.active_probes()
    assert _global_hook_counts() == before, "global hooks leaked"
    now = (torch.autograd.backward, F.mse_loss, F.cross_entropy, torch.amp.GradScaler.update, torch.optim.Optimizer.__init__)
    assert now == originals, "a patched function was not restored"


@pytest.fixture
def logdir(tmp_path):
    return str(tmp_path / "run")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_configure(config):
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 3000))
