"""The results table of the reliability suites: rows written by the tests -> markdown.

    python -m tests.reliability.report RESULTS_DIR [--doc docs/reliability.md] [--note TEXT]

prints the table of the rows in RESULTS_DIR and, with --doc, replaces the part of the document
between the two `reliability-results` markers with it (scripts/reliability does both).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

START = "<!-- reliability-results:start -->"
END = "<!-- reliability-results:end -->"
# Suites in the order of docs/reliability.md.
ORDER = ("worker crashes", "drain killed after its GET", "redis restarts", "redis kill -9 mid-call",
         "clock with Redis failing", "provider fault storm", "provider outage", "bad input",
         "bad input (entries marked src=api)", "security")


def load_rows(directory: Path) -> list[dict[str, Any]]:
    """Every row file in `directory`, oldest first."""
    files = sorted(directory.glob("*.json"), key=lambda p: p.stat().st_mtime)
    return [orjson.loads(p.read_bytes()) for p in files]


def _merge(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per suite: the trials of a suite add up."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        key = (row["suite"], row["mode"])
        line = merged.get(key)
        if line is None:
            merged[key] = line = {**row, "faults": dict(row["faults"]), "counts": dict(row.get("counts", {})),
                                  "results": [row["result"]],
                                  "notes": [row["note"]] if row["note"] else []}
            continue
        for name in ("trials", "jobs", "lost", "duplicated", "reports", "report_events", "events", "dead_letters",
                     "no_send_event", "seconds"):
            line[name] += row.get(name, 0)
        for name, n in row["faults"].items():
            line["faults"][name] = line["faults"].get(name, 0) + n
        for name, n in row.get("counts", {}).items():
            line["counts"][name] = line["counts"].get(name, 0) + n
        line["results"].append(row["result"])
        if row["note"] and row["note"] not in line["notes"]:
            line["notes"].append(row["note"])
    return sorted(merged.values(), key=lambda r: (ORDER.index(r["suite"]) if r["suite"] in ORDER else 99, r["mode"]))


def _faults(faults: dict[str, int]) -> str:
    return ", ".join(f"{name} {n:,}" for name, n in sorted(faults.items()) if n) or "none"


def _result(results: list[str]) -> str:
    failed = sum(1 for r in results if r != "passed")
    if not failed:
        return "passed"
    return f"**FAILED** ({failed}/{len(results)})" if len(results) > 1 else f"**{results[0].upper()}**"


def render_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: one line per suite, then the notes."""
    lines = [
        "| suite | mode | trials | faults injected | jobs | lost | duplicated | reports → final events | events "
        "| dead letters | time (s) | result |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    notes: list[str] = []
    for r in _merge(rows):
        lines.append(
            f"| {r['suite']} | {r['mode']} | {r['trials']} | {_faults(r['faults'])} | {r['jobs']:,} | {r['lost']:,} "
            f"| {r['duplicated']:,} | {r['reports']:,} → {r['report_events']:,} | {r['events']:,} "
            f"| {r['dead_letters']:,} | {r['seconds']:.0f} | {_result(r['results'])} |"
        )
        notes += [f"- {r['suite']}: {note}" for note in r["notes"]]
        notes += [f"- {r['suite']}: {name}: {n:,}" for name, n in sorted(r["counts"].items())]
        if r.get("no_send_event"):
            notes.append(f"- {r['suite']}: {r['no_send_event']:,} messages got their final report event without an "
                         "`accepted` event first (the report came before the send's outcome was known: a killed "
                         "worker's batch awaiting recovery, or a timed-out/dropped POST awaiting reconciliation)")
    return "\n".join(lines + (["", *notes] if notes else []))


def write_doc(doc: Path, table: str, note: str) -> None:
    """Replace the results part of `doc` (between the markers) with the table."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    block = f"{START}\n_Produced {stamp} on {platform.node() or 'this machine'} ({platform.machine()}, " \
            f"{_cpus()} CPUs)._ {note}\n\n{table}\n{END}"
    text = doc.read_text() if doc.exists() else f"# Reliability\n\n## Results\n\n{START}\n{END}\n"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + f"\n\n## Results\n\n{block}\n"
    doc.write_text(text)


def _cpus() -> int:
    return os.cpu_count() or 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.reliability.report", description=__doc__)
    parser.add_argument("results", type=Path, help="directory of row files (SMS_RELIABILITY_RESULTS)")
    parser.add_argument("--doc", type=Path, help="markdown file whose results part is replaced")
    parser.add_argument("--note", default="", help="a sentence saying what was run")
    args = parser.parse_args(argv)
    rows = load_rows(args.results)
    if not rows:
        print(f"no result rows in {args.results}", file=sys.stderr)
        return 1
    table = render_table(rows)
    print(table)
    if args.doc:
        write_doc(args.doc, table, args.note)
        print(f"\nwritten to {args.doc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
