"""Which process of a distributed run this is: the one rank helper of gradprobe.

Used by the probe (its run directory and metadata, at start and again at the first recorded
step, when the process group usually exists) and by ``gradprobe run`` (the tree's log
directory under torchrun). No collective is issued, and torch is not imported for it: a
process group can only exist once the script imported ``torch.distributed``.
"""

from __future__ import annotations

import os
import sys


def rank_and_world() -> tuple[int, int]:
    """(global rank, world size): from ``torch.distributed`` once a process group exists,
    else from the launcher's environment (torchrun's ``RANK``, or ``LOCAL_RANK`` where there
    is no ``RANK``: Lightning's children); (0, 1) outside a distributed launch."""
    try:
        rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        rank, world = 0, 1
    dist = sys.modules.get("torch.distributed")
    if dist is not None:
        try:
            if dist.is_available() and dist.is_initialized():
                rank, world = dist.get_rank(), dist.get_world_size()
        except Exception:  # noqa: BLE001 - a half-torn-down group: the environment's answer
            pass
    return rank, world
