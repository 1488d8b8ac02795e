"""The end of scripts/test.sh's output: the slowest tests over its pytest
runs (set-up + call + teardown: a module fixture's cost lands on the first
test that uses it), the wall times, and one total line. Reads the JSON
files the root conftest.py writes (JETSPEC_TEST_REPORT)."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path


def minutes(s: float) -> str:
    return f"{int(s) // 60}m{int(s) % 60:02d}s"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("report_dir", type=Path)
    p.add_argument("--setup-s", type=float, required=True)
    p.add_argument("--exclusive-s", type=float, required=True)
    p.add_argument("--parallel-s", type=float, required=True)
    p.add_argument("--workers", type=int, required=True)
    p.add_argument("--slowest", type=int, default=15)
    p.add_argument("--write-durations", type=Path,
                   help="write {test: seconds} here (scheduling order)")
    a = p.parse_args()

    tests: dict[str, list] = {}
    for f in sorted(a.report_dir.glob("*.json")):
        tests.update(json.loads(f.read_text()))
    slow = sorted(tests.items(), key=lambda kv: -kv[1][0])[:a.slowest]
    print(f"\n{len(slow)} slowest tests (set-up + call + teardown; "
          f"{a.workers} worker(s) on their own cores, exclusive tests "
          "alone):")
    for node, (secs, outcome) in slow:
        flag = "" if outcome == "passed" else f"  [{outcome}]"
        print(f"  {secs:7.1f} s  {node}{flag}")
    print(f"wall time: set-up {minutes(a.setup_s)}, tests "
          f"{minutes(a.exclusive_s + a.parallel_s)} (exclusive "
          f"{minutes(a.exclusive_s)}, parallel {minutes(a.parallel_s)})")
    if a.write_durations:
        a.write_durations.write_text(json.dumps(
            {k: round(v[0], 1) for k, v in sorted(tests.items())},
            indent=1) + "\n")
        print(f"durations written to {a.write_durations}")
    n = Counter(o for _, o in tests.values())
    if n["error"]:
        print(f"{n['error']} of the failed tests failed in set-up or "
              "teardown")
    # One closing line for both pytest runs, in pytest's words.
    print(f"total: {n['passed']} passed, {n['failed'] + n['error']} failed, "
          f"{n['skipped']} skipped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
