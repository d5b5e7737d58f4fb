"""The results table: targets beside measurements, printed as text and written as JSON."""

from __future__ import annotations

import math
import os
import platform
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson


@dataclass(frozen=True)
class Target:
    """`value <op> bound`, e.g. rate >= 50,000."""

    op: str  # ">=" or "<="
    bound: float
    unit: str

    def holds(self, value: float) -> bool:
        if math.isnan(value):
            return False
        return value >= self.bound if self.op == ">=" else value <= self.bound

    def gap(self, value: float) -> str:
        """How far a miss is from the target, e.g. `-77%` or `+5.3 MB`."""
        if self.holds(value) or math.isnan(value):
            return ""
        if self.op == ">=":
            return f"{value / self.bound - 1:+.0%}"
        return f"{value - self.bound:+.1f} {self.unit}"

    def __str__(self) -> str:
        return f"{self.op} {_num(self.bound)} {self.unit}".strip()


# The targets on the 2-core machine, everything co-located.
TARGETS = {
    "e2e_rate": Target(">=", 50_000, "SMS/s"),
    "e2e_ratio": Target(">=", 35, "x"),
    "producer_rate": Target(">=", 100_000, "jobs/s"),
    "otp_p99": Target("<=", 50, "ms"),
    "slow_rate": Target(">=", 30_000, "SMS/s"),
    "reports_rate": Target(">=", 50_000, "reports/s"),
    "peak_rss": Target("<=", 150, "MB"),
    # Issue #15: every guard on costs at most 15% of the throughput with them off, same run.
    "guards_ratio": Target(">=", 0.85, "x"),
}


@dataclass
class Row:
    """One line of the table; `target` None for context rows."""

    scenario: str
    what: str
    value: float
    unit: str
    target: str | None = None
    runs: list[float] | None = None
    note: str = ""

    def verdict(self) -> str:
        if self.target is None:
            return ""
        target = TARGETS[self.target]
        if math.isnan(self.value):
            return "n/a"
        return "PASS" if target.holds(self.value) else f"FAIL ({target.gap(self.value)})"

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["target"] = str(TARGETS[self.target]) if self.target else None
        data["verdict"] = self.verdict()
        return data


def _num(value: float) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:,.1f}"
    return f"{value:,.2f}"


def format_table(rows: list[Row]) -> str:
    """A fixed-width table: scenario, measurement, median, runs, target, verdict."""
    header = ("#", "measurement", "median", "runs", "target", "result")
    lines = []
    for r in rows:
        runs = " / ".join(_num(v) for v in r.runs) if r.runs and len(r.runs) > 1 else ""
        target = str(TARGETS[r.target]) if r.target else ""
        lines.append((r.scenario, r.what, f"{_num(r.value)} {r.unit}".strip(), runs, target, r.verdict()))
    widths = [max(len(str(x[i])) for x in [header, *lines]) for i in range(len(header))]
    out = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines]
    notes = [f"  [{r.scenario}] {r.what}: {r.note}" for r in rows if r.note]
    return "\n".join(out + (["", *notes] if notes else []))


def format_markdown(rows: list[Row]) -> str:
    """The same table in Markdown, for docs/performance.md."""
    out = ["| # | measurement | median | runs | target | result |", "|---|---|---|---|---|---|"]
    for r in rows:
        runs = " / ".join(_num(v) for v in r.runs) if r.runs and len(r.runs) > 1 else ""
        target = str(TARGETS[r.target]) if r.target else ""
        out.append(f"| {r.scenario} | {r.what} | {_num(r.value)} {r.unit} | {runs} | {target} | {r.verdict()} |")
    return "\n".join(out)


def _first_line(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine() -> dict[str, Any]:
    """What the numbers were measured on: cores, CPU model, memory, versions, load."""
    cpu_model = ""
    mem_kb = 0
    try:
        cpu_model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                          if line.startswith("model name")), "")
        mem_kb = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                          if line.startswith("MemTotal")))
    except (OSError, StopIteration):
        pass
    redis_server = shutil.which("redis-server")
    repo = Path(__file__).resolve().parent.parent
    commit = _first_line(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"])
    dirty = bool(_first_line(["git", "-C", str(repo), "status", "--porcelain", "--", "worker"]))
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "redis": _first_line([redis_server, "--version"]) if redis_server else "",
        "kernel": platform.release(),
        "loadavg_at_start": os.getloadavg(),
        "git_commit": commit + ("+dirty(worker/)" if dirty else ""),
    }


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(payload, option=orjson.OPT_INDENT_2, default=str))
    return path


def timestamp() -> str:
    return time.strftime("%Y%m%dT%H%M%S")
