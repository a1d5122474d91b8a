"""The rows of one GPU call (``scripts/gpu_check.sh``): one JSON line each, appended to
OUT/rows.jsonl the moment it exists (``scripts/bench_table.py`` renders them). ``Rows`` is what
``benchmarks/lease.py``'s phases write with; the GPU test files' rows are written from here,
one process per test file, without importing torch (only a file's first row, which carries
the machine's versions, does):

    python benchmarks/lease_rows.py junit XML --out ROWS.jsonl --file NAME --rc RC --took S
"""

from __future__ import annotations

import argparse
import json
import os
import time
import xml.etree.ElementTree as ET
from datetime import datetime, timezone


class Rows:
    """Appends one JSON line per row (``scripts/bench_table.py`` reads them) and keeps the
    phase's deadline."""

    def __init__(self, path: str, phase: str, seconds: float, toy: bool):
        self.path, self.phase, self.toy = path, phase, toy
        self.deadline = time.monotonic() + seconds
        # The machine goes on the file's first row that has one (the shell's notes have none).
        self.first = not (os.path.exists(path) and '"machine":' in open(path).read())
        self.cut = False

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def fits(self, what: str, est_s: float) -> bool:
        """Whether a row of ``est_s`` seconds fits; once one does not, the rest of the phase
        is cut (one note, later rows are not tried)."""
        if self.cut:
            return False
        if self.toy:
            est_s = min(est_s, 2.0)  # toy sizes: the estimates are the GPU's
        if est_s > self.left():
            self.note(f"cut before {what}: it needs about {est_s:.0f} s, {self.left():.0f} s of the phase left")
            self.cut = True
            return False
        return True

    def write(self, group: str, impl: str, ms: float | None = None, **info) -> None:
        row = {"group": group, "name": f"{self.phase}[{impl}]",
               "stats": {"median": (ms or 0.0) / 1e3}, "extra_info": {"impl": impl, "phase": self.phase, **info},
               "datetime": datetime.now(timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
        if ms is not None:
            row["extra_info"]["ms"] = round(ms, 5)
        if self.first:
            from conftest import device_info  # imports torch: only for the file's first row

            row["machine"] = device_info()
            self.first = False
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        print(f"  {group} | {impl} | " + (f"{ms:.3f} ms" if ms is not None else "") + " "
              + " ".join(f"{k}={v}" for k, v in info.items() if k not in ("target",)), flush=True)  # fmt: skip

    def note(self, text: str) -> None:
        self.write(f"{self.phase} notes", "note", note=text)


#################################################################################
#                                   junit rows                                   #
#################################################################################


def junit_row(rows: Rows, xml_path: str, file: str, rc: int, took: float) -> None:
    """One row per GPU test file: passed / failed / skipped counts and the failing ids."""
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed = []
    try:
        root = ET.parse(xml_path).getroot()
        for suite in root.iter("testsuite"):
            for k in counts:
                counts[k] += int(suite.get(k, 0))
        for case in root.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(case.get("name"))
    except (OSError, ET.ParseError):
        pass  # cut before pytest wrote its report: the rc says so
    state = {0: "ok", 5: "none selected", 124: "CUT (file timeout)", 137: "KILLED"}.get(rc, f"exit {rc}")
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    rows.write("gpu tests", file, took * 1e3, state=state, passed=passed, failed=counts["failures"] + counts["errors"],
               skipped=counts["skipped"], failing=", ".join(failed[:8]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["junit"])
    parser.add_argument("xml")
    parser.add_argument("--out", required=True)
    parser.add_argument("--file", default="")
    parser.add_argument("--rc", type=int, default=0)
    parser.add_argument("--took", type=float, default=0.0)
    args = parser.parse_args(argv)
    junit_row(Rows(args.out, "junit", 600.0, False), args.xml, args.file, args.rc, args.took)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
