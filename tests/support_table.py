"""Regenerates the README's support table from the test matrix: runs every cell's test
(`tests/test_matrix.py::test_cell`) and writes `yes` only where that test passed.

    python tests/support_table.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from matrix import END, START, render  # noqa: E402

README = HERE.parent / "README.md"


class Outcomes:
    """A pytest plugin that records, per cell id, whether every phase of its test passed."""

    def __init__(self):
        self.passed: dict[str, bool] = {}

    def pytest_runtest_logreport(self, report) -> None:
        cell = report.nodeid.partition("[")[2].removesuffix("]")
        if report.failed:
            self.passed[cell] = False
        elif report.when == "call":
            self.passed.setdefault(cell, True)


def with_table(text: str, table: str) -> str:
    """`text` with the block between the support-table markers replaced by `table`."""
    before, _, rest = text.partition(START)
    _, _, after = rest.partition(END)
    return before + table + after


def readme_table(text: str) -> str:
    """The support-table block as the README holds it, markers included."""
    return START + text.partition(START)[2].partition(END)[0] + END


def main() -> int:
    outcomes = Outcomes()
    status = pytest.main(["-q", "-p", "no:cacheprovider", f"{HERE / 'test_matrix.py'}::test_cell"], plugins=[outcomes])
    temporary = README.with_suffix(".md.tmp")
    temporary.write_text(with_table(README.read_text(), render(outcomes.passed)))
    temporary.replace(README)
    print(f"{README}: {sum(outcomes.passed.values())} of {len(outcomes.passed)} cells pass")
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
