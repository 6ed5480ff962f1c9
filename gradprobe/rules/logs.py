"""GP7xx: logging hygiene (duplicate-log-records)."""

from __future__ import annotations
