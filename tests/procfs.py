"""The machine's live processes, read from /proc (Linux only): who started each, its session, the
CPU it has used and a readable name. tests/fault_harness.py lists a killed run's leftovers with it;
benchmarks/data_throughput.py --cpu measures where a training loop's CPU went."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class Process:
    parent: int
    session: int
    cpu_seconds: float  # user + system
    name: str


def live_processes() -> dict[int, Process]:
    """Every live (non-zombie) process: pid -> Process, in pid order."""
    found = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as file:
                text = file.read()
            # "pid (comm) state ppid pgrp session ... utime stime ...": comm may hold spaces and
            # parentheses; utime and stime are fields 14 and 15, in clock ticks.
            fields = text[text.rindex(")") + 2:].split()
            if fields[0] == "Z":
                continue
            pid = int(text.split(" ", 1)[0])
            with open(f"/proc/{pid}/cmdline", "rb") as file:
                argv = file.read().split(b"\0")
        except (OSError, ValueError):  # exited while we looked
            continue
        found[pid] = Process(int(fields[1]), int(fields[3]), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS,
                             process_name([arg.decode(errors="replace") for arg in argv if arg]))
    return dict(sorted(found.items()))


def process_name(argv: list[str]) -> str:
    """`ray::Title` for Ray workers, else the program's name; for Python, `python SCRIPT` (or -m/-c ...)."""
    if not argv:
        return "?"
    if argv[0].startswith("ray::") or " " in argv[0]:  # a process title set by Ray or a dashboard module
        return argv[0].split(" (")[0].strip()
    name = os.path.basename(argv[0])
    if not name.startswith("python"):
        return name
    rest = [arg for arg in argv[1:] if not arg.startswith("-") or arg in ("-m", "-c")][:2]
    script = rest[0] if rest and rest[0] not in ("-m", "-c") else " ".join(rest)
    return f"python {os.path.basename(script)[:40]}".strip()  # python, python3, python3.11: one name


def descends_from(pid: int, ancestor: int, processes: dict[int, Process]) -> bool:
    """Whether `ancestor` is among the parents of `pid`."""
    while pid in processes and pid > 1:
        pid = processes[pid].parent
        if pid == ancestor:
            return True
    return False
