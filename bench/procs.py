"""What the kernel knows about our child processes: CPU seconds of a process tree, peak RSS.

Everything is read from /proc (Linux), so the harness needs no psutil. A dramatiq worker is a
tree (the `dramatiq` supervisor and the worker process it forks), so CPU is summed over the
tree of live descendants; a process that has exited is not counted (none exits mid-measurement).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces: split after the last ")".
    return raw.rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used by one process so far (0.0 once it is gone)."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S


def children(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc/<pid>/task/*/children."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def tree(pid: int) -> list[int]:
    """`pid` and all its live descendants."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        if _stat_fields(current) is None:
            continue
        pids.append(current)
        todo += children(current)
    return pids


def tree_cpu_seconds(pid: int) -> float:
    return sum(cpu_seconds(p) for p in tree(pid))


def status_kb(pid: int, field: str) -> int:
    """A `kB` field of /proc/<pid>/status (VmHWM: peak RSS, VmRSS: current RSS); 0 when unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class CpuMeter:
    """CPU seconds per named component between `start()` and `stop()`; components are pid trees."""

    def __init__(self, components: Mapping[str, Iterable[int]]) -> None:
        self.components = {name: list(pids) for name, pids in components.items()}
        self._before: dict[str, float] = {}
        self.used_s: dict[str, float] = {}

    def _read(self) -> dict[str, float]:
        return {name: sum(tree_cpu_seconds(p) for p in pids) for name, pids in self.components.items()}

    def start(self) -> None:
        self._before = self._read()

    def stop(self) -> dict[str, float]:
        after = self._read()
        self.used_s = {name: max(0.0, after[name] - self._before[name]) for name in after}
        return self.used_s


def wait_quiet(pids: Iterable[int], *, busy_below: float = 0.05, window_s: float = 0.25,
               timeout_s: float = 20.0) -> float:
    """Until the process trees of `pids` together use less than `busy_below` of a core over one
    `window_s` (booted and idle: imports, forks and first connections are not a run's cost);
    the seconds waited. Past `timeout_s` it returns anyway: a stack that never goes quiet is
    measured as it is."""
    roots = list(pids)
    start = last_t = time.monotonic()
    last = sum(tree_cpu_seconds(p) for p in roots)
    while True:
        time.sleep(window_s)
        now, used = time.monotonic(), sum(tree_cpu_seconds(p) for p in roots)
        if (used - last) / (now - last_t) < busy_below or now - start > timeout_s:
            return now - start
        last, last_t = used, now
