"""Summarise a JUnit report of the fast suite (``make test`` writes ``outputs/tests/fast.xml``):
total seconds, tests, the slowest tests and the seconds per test file, as a Markdown table.

    python experiments/layout/test_durations.py outputs/tests/fast.xml experiments/layout/test_durations_<commit>.md
    python experiments/layout/test_durations.py outputs/tests/fast.xml --slowest 15   # what make test prints

Each test's time is its setup + call + teardown, as JUnit records it; session fixtures land on the
first test that asks for them."""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path


def summarise(report: Path, slowest: int = 25, per_file: bool = True) -> str:
    suite = ET.parse(report).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    cases = []
    for case in suite.iter("testcase"):
        outcome = (
            "skipped"
            if case.find("skipped") is not None
            else "failed"
            if case.find("failure") is not None
            else "passed"
        )
        cases.append((float(case.get("time", 0)), case.get("classname", ""), case.get("name", ""), outcome))
    files: dict[str, float] = defaultdict(float)
    for seconds, cls, _, _ in cases:
        files[cls.rsplit(".", 1)[0] if cls.count(".") > 1 else cls] += seconds
    total = sum(c[0] for c in cases)
    lines = [
        f"# Fast-suite durations: {report}",
        "",
        f"- tests: {len(cases)} ({sum(c[3] == 'passed' for c in cases)} passed, "
        f"{sum(c[3] == 'failed' for c in cases)} failed, {sum(c[3] == 'skipped' for c in cases)} skipped)",
        f"- seconds in tests (sum of each test's setup, call and teardown): {total:.0f}",
        f"- pytest's own wall time for the session: {float(suite.get('time', 0)):.0f} s",
        "",
        f"## The {slowest} slowest tests",
        "",
        "| seconds | test |",
        "|---:|---|",
        *[f"| {s:.1f} | {c}::{n} |" for s, c, n, _ in sorted(cases, reverse=True)[:slowest]],
        "",
    ]
    if not per_file:
        return "\n".join(lines)
    lines += [
        "## Seconds per test file",
        "",
        "| seconds | share | file |",
        "|---:|---:|---|",
        *[f"| {s:.0f} | {s / total:.0%} | {f} |" for f, s in sorted(files.items(), key=lambda kv: -kv[1])],
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    args = sys.argv[1:]
    if "--slowest" in args:  # the totals and the N slowest tests only, on the console
        at = args.index("--slowest")
        print(summarise(Path(args[0]), int(args[at + 1]), per_file=False))
    else:
        text = summarise(Path(args[0]))
        print(text)
        if len(args) > 1:
            Path(args[1]).write_text(text)
