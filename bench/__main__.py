"""python -m bench: see bench/__init__.py."""

import sys

from bench import main

res = main()
rows = res.get("rows", {})
failed = [r["label"] for r in (rows.values() if isinstance(rows, dict) else rows) if "error" in r]
if failed:  # out of memory is an answer; any other error is a failure, its traceback printed where it happened
    sys.exit(f"error: {len(failed)} row(s) failed: {'; '.join(failed)}")
