"""GP6xx: data and initialization (input-scale, degenerate-targets, poor-initialization, saturated-activations, dead-units)."""

from __future__ import annotations
