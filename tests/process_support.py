"""Processes a test started, found from /proc (no psutil): their descendants, those whose command line
names a test's own directory, and killing them (TERM, then KILL) by pid."""

from __future__ import annotations

import os
import signal
import time


def descendants(pids: set[int]) -> set[int]:
    """``pids`` and every process below them (from /proc: no psutil needed)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = set(), list(pids)
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.add(pid)
            todo.extend(children.get(pid, []))
    return out


def processes_mentioning(text: str) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if text in open(f"/proc/{entry}/cmdline").read():
                    found.add(int(entry))
            except OSError:
                pass
    return found


def kill_tree(pids: set[int], grace_s: float = 5.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") and
                                                  "zombie" not in open(f"/proc/{p}/status").read().lower()
                                                  for p in pids if os.path.exists(f"/proc/{p}")):
            time.sleep(0.2)
