"""CPU time and memory of a process tree, read straight from /proc (no psutil).

CPU: utime + stime + cutime + cstime of every live process in the tree. A
child that exits is reaped by its parent (for Postfix: master) and its time
moves into the parent's cutime/cstime, so the tree total only ever grows and
``after - before`` is the CPU the tree spent in between, exited children
included.

Memory: VmHWM is each process's peak resident set. Writing "5" to
/proc/PID/clear_refs resets it to the current RSS (Linux >= 4.0, needs root
or the same user), so a measurement window can start from "now".
"""

from __future__ import annotations

import os
from dataclasses import dataclass

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may contain spaces.
    return text[text.rindex(")") + 2:].split()


def children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat_fields(int(name))
        if fields is None:
            continue
        kids.setdefault(int(fields[1]), []).append(int(name))  # fields[1] = ppid
    return kids


def tree(root: int) -> list[int]:
    """``root`` and all its live descendants."""
    kids = children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, ()))
    return out


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            # After the "(comm) " prefix: state=0 ppid=1 ... utime=11 stime=12 cutime=13 cstime=14
            total += sum(int(x) for x in fields[11:15])
    return total / CLOCK_TICKS


def status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peaks(pids: list[int]) -> None:
    for pid in pids:
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def pss_kb(pids: list[int]) -> int:
    """Proportional set size summed over pids: shared pages split between sharers."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


@dataclass
class Memory:
    hwm_sum_kb: int      # sum of every process's own peak (upper bound: shared pages counted per process)
    hwm_max_kb: int      # the largest single process's peak
    processes: int


def peak_memory(pids: list[int]) -> Memory:
    peaks = [status_kb(pid, "VmHWM") for pid in pids]
    peaks = [p for p in peaks if p]
    return Memory(sum(peaks), max(peaks, default=0), len(peaks))
