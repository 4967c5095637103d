"""Every run recorded in its folder (record), and a folder of runs read and compared (library)."""
from .library import CURVES, PREFERENCE_COLUMNS, Run, changed, config_diff, curves, delete, find, find_runs, show, table
from .record import RECORD, RunRecord

__all__ = ["CURVES", "PREFERENCE_COLUMNS", "RECORD", "Run", "RunRecord", "changed", "config_diff", "curves", "delete",
           "find", "find_runs", "show", "table"]
