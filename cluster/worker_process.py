"""A worker as a local child process: ``python -m shoal.workers.server`` started, awaited, stopped.

``shoal serve`` runs its workers this way on one machine; the cluster path runs the same server
inside Ray actors. The child prints ``READY host:port`` once it listens; until then it is loading.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field


class WorkerStartError(RuntimeError):
    """A worker did not become ready; ``summary`` is the one line a user needs (the worker's own error
    line when it printed one), the message adds the tail of its log."""

    def __init__(self, summary: str, log_tail: list[str] = ()) -> None:
        super().__init__(summary + ("\n" + "\n".join(log_tail) if log_tail else ""))
        self.summary = summary


def _last_error(lines: list[str]) -> str | None:
    """The worker's own one-line error (``shoal worker: error: ...``), else its last non-empty line."""
    for line in reversed(lines):
        if line.startswith("shoal worker: error: "):
            return line.removeprefix("shoal worker: error: ")
    return next((line for line in reversed(lines) if line.strip()), None)


@dataclass
class WorkerProcess:
    worker_id: str
    engine_args: list[str]  # the child's flags: the engine's (``--model ...``), then any ``--kv-*``
    host: str = "127.0.0.1"
    role: str = "unified"
    env: dict[str, str] = field(default_factory=dict)
    endpoint: str | None = None
    _proc: subprocess.Popen | None = None
    _log_tail: list[str] = field(default_factory=list)

    def command(self) -> list[str]:
        # --parent-pid: the child arranges to get SIGTERM when this process dies, even by SIGKILL. It
        # does so itself, rather than in a preexec_fn here: that would make Popen fork() a process
        # full of gRPC threads instead of vfork + exec.
        return [sys.executable, "-m", "shoal.workers.server", "--host", self.host, "--port", "0",
                "--worker-id", self.worker_id, "--role", self.role, "--parent-pid", str(os.getpid()),
                *self.engine_args]

    def start(self) -> None:
        self._log_tail = []
        self.endpoint = None
        self._proc = subprocess.Popen(
            self.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            env={**os.environ, **self.env}, start_new_session=True)  # Ctrl-C reaches us, not it

    def wait_ready(self, timeout_s: float) -> str:
        """Block until the READY line; then keep draining its output so the pipe never fills."""
        assert self._proc is not None and self._proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        ready = threading.Event()

        def pump():
            for line in self._proc.stdout:
                line = line.rstrip("\n")
                if line.startswith("READY ") and not ready.is_set():
                    self.endpoint = line.split(" ", 1)[1]
                    ready.set()
                else:
                    self._log_tail = (self._log_tail + [line])[-50:]
                    if ready.is_set() and os.environ.get("SHOAL_WORKER_LOGS"):
                        print(f"[{self.worker_id}] {line}", file=sys.stderr)

        pumping = threading.Thread(target=pump, name=f"pump-{self.worker_id}", daemon=True)
        pumping.start()
        while not ready.wait(0.1):
            if self._proc.poll() is not None:
                pumping.join(5.0)  # its last lines (the error) reach the tail at EOF
                reason = _last_error(self._log_tail) or f"exit code {self._proc.returncode}"
                raise WorkerStartError(f"worker {self.worker_id} failed to start: {reason}", self._log_tail[-20:])
            if time.monotonic() > deadline:
                self.stop()
                raise WorkerStartError(f"worker {self.worker_id} was not ready within {timeout_s:.0f} s "
                                       f"(--worker-start-timeout)", self._log_tail[-20:])
        return self.endpoint

    def alive(self) -> bool:
        """Whether the process runs; polling reaps an exited child, so none is left a zombie."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def kill(self) -> None:
        """SIGKILL, now (a hung worker cannot drain); the supervisor reaps and restarts it."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM (the server drains), then SIGKILL if it lingers; returns the exit code."""
        if self._proc is None or self._proc.poll() is not None:
            return None if self._proc is None else self._proc.returncode
        self._proc.send_signal(signal.SIGTERM)
        try:
            return self._proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            return self._proc.wait()
