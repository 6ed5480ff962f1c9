"""The run log: what a probe records, on disk and in memory."""

from gradprobe.runlog.runlog import LogError, RunLog, is_run_dir
from gradprobe.runlog.schema import MISSING, RUN_SCHEMA

__all__ = ["LogError", "RunLog", "is_run_dir", "MISSING", "RUN_SCHEMA"]
