"""GP1xx: recurrent state and graph retention (undetached-hidden-state, long-lookback, graph-retained-across-steps)."""

from __future__ import annotations
