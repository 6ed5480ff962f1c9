"""GP4xx: non-finite values, ordered inputs -> loss -> gradients -> parameters."""

from __future__ import annotations
