"""GP3xx: mixed precision (high-init-scale, fp16-overflow, amp-without-scaler, mixed-precision-active, scaler-misuse)."""

from __future__ import annotations
