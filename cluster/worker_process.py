"""A worker as a local child process: ``python -m shoal.workers.server`` started, awaited, stopped.

``shoal serve`` runs its workers this way on one machine; the cluster path runs the same server
inside Ray actors. The child prints ``READY host:port`` once it listens; until then it is loading.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field


class WorkerStartError(RuntimeError):
    pass


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the parent dies, even by SIGKILL (Linux)."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


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
        return [sys.executable, "-m", "shoal.workers.server", "--host", self.host, "--port", "0",
                "--worker-id", self.worker_id, "--role", self.role, *self.engine_args]

    def start(self) -> None:
        self._proc = subprocess.Popen(
            self.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            env={**os.environ, **self.env}, start_new_session=True,  # Ctrl-C reaches us, not it
            preexec_fn=_die_with_parent)

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

        threading.Thread(target=pump, name=f"pump-{self.worker_id}", daemon=True).start()
        while not ready.wait(0.1):
            if self._proc.poll() is not None:
                raise WorkerStartError(f"worker {self.worker_id} exited with code {self._proc.returncode} "
                                       f"before it was ready:\n" + "\n".join(self._log_tail[-20:]))
            if time.monotonic() > deadline:
                self.stop()
                raise WorkerStartError(f"worker {self.worker_id} was not ready within {timeout_s:.0f} s")
        return self.endpoint

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

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
