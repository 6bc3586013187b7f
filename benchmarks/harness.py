"""Shared benchmark helpers: timing stats, environment stamp, JSON rows, tables.

There is one implementation, in ``crossent._bench`` (so the installed
``crossent bench`` command can use it); this module only re-exports it for
scripts under benchmarks/.  Import it after making ``src`` importable, or with
crossent installed.
"""
from __future__ import annotations

import sys
from pathlib import Path

try:
    import crossent  # noqa: F401  (installed, or src already on sys.path)
except ImportError:  # running from a checkout: use its src/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from crossent._bench import (FULL_CASES, QUICK_CASES, add_ratios, env_stamp, format_table, run,  # noqa: E402
                             select_cases, write_json)
from crossent._bench_worker import BYTES_FACTOR, PROVIDERS, gbps, median, parse_case, quantile, summarize  # noqa: E402

__all__ = ["BYTES_FACTOR", "FULL_CASES", "PROVIDERS", "QUICK_CASES", "add_ratios", "env_stamp",
           "format_table", "gbps", "median", "parse_case", "quantile", "run", "select_cases",
           "summarize", "write_json"]
