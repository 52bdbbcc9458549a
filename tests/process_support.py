"""Processes a test started, found from /proc (no psutil): their descendants, those whose command line
or environment names a test's own directory, and killing them (TERM, then KILL) by pid."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
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
    """Processes (not this one) whose command line or initial environment names ``text``: the
    environment catches those started with a test's directory only in it (Ray's client server
    proxy: ``RAY_TMPDIR``), which outlive their parent."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            for part in ("cmdline", "environ"):
                try:
                    if text in open(f"/proc/{entry}/{part}", errors="replace").read():
                        found.add(int(entry))
                        break
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


class OutputLines:
    """A child's stdout lines, read in a thread; :meth:`wait_for` a regex without sleeping."""

    def __init__(self, proc: subprocess.Popen, name: str = "process") -> None:
        self.proc, self.name, self.lines, self.changed = proc, name, [], threading.Condition()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()
        with self.changed:
            self.lines.append(None)  # the child closed its output
            self.changed.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        def hit():
            return next((m for l in self.lines if l is not None for m in [re.search(pattern, l)] if m), None)

        with self.changed:
            self.changed.wait_for(lambda: hit() or None in self.lines, timeout)
            m = hit()
        assert m, f"{self.name}: no line matching {pattern!r} within {timeout} s:\n{self.text()[-3000:]}"
        return m

    def text(self) -> str:
        return "".join(l for l in self.lines if l is not None)
