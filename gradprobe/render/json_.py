"""JSON renderer: the report as ``gradprobe/schemas/report.schema.json`` states it (the tests
validate every report against it)."""

from __future__ import annotations

import json
from typing import Any

from gradprobe.report import Report


def render(report: Report, **_: Any) -> str:
    return json.dumps(report.to_json(), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
