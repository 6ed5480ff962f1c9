"""GP5xx: optimization (lr-too-high, lr-too-low, missing-weight-decay, loss-spike, loss-plateau, overfitting)."""

from __future__ import annotations
