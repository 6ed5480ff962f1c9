"""The recorder: hooks, patches and the step buffer (see :mod:`gradprobe.probe.core`).

``Probe`` and ``watch`` are loaded on first use, so the torch-free parts
(:mod:`~gradprobe.probe.ranks`, :mod:`~gradprobe.probe.rescaling`) import without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gradprobe.probe.core import Probe, watch

__all__ = ["Probe", "watch"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from gradprobe.probe import core

        return getattr(core, name)
    raise AttributeError(f"module 'gradprobe.probe' has no attribute {name!r}")
