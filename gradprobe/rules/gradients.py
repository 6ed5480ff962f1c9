"""GP2xx: gradient magnitude (overclipping, exploding-gradients, vanishing-gradients, missing-gradient-clipping)."""

from __future__ import annotations
