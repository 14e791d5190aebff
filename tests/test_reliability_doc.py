"""docs/reliability.md's table of injected faults is checked against the test suite itself: every test
it names exists, and its "cases" number is how many cases pytest collects for those tests."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def table_rows() -> list[tuple[list[str], int]]:
    rows = []
    for line in (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[2].isdigit():
            rows.append((re.findall(r"`(tests/[^`]+::[^`]+)`", cells[1]), int(cells[2])))
    return rows


def test_the_fault_table_counts_what_the_suite_collects():
    rows = table_rows()
    assert len(rows) >= 20
    files = sorted({name.split("::")[0] for names, _ in rows for name in names})
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    collected = Counter(re.sub(r"\[.*\]$", "", line.strip()) for line in out.stdout.splitlines() if "::" in line)
    for names, cases in rows:
        assert names, "each row names the test that injects the fault"
        for name in names:
            assert collected[name] > 0, f"{name} is named in docs/reliability.md but not collected"
        assert sum(collected[name] for name in names) == cases, (names, cases)
