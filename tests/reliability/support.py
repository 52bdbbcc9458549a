"""Checks the reliability tests make after a workload: KV blocks back to 0 on every worker (read from
the router's ``/metrics``, where each worker's series carry ``worker="<id>"``), ports free, processes gone."""

from __future__ import annotations

import os
import socket
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families


def kv_blocks_in_use(base: str) -> dict[str, float]:
    """worker id -> ``shoal:kv_blocks_in_use`` as the router at ``base`` (no /v1) reports it now."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "shoal:kv_blocks_in_use":
                out[sample.labels["worker"]] = sample.value
    return out


def wait_kv_blocks_free(base: str, workers: set[str], timeout: float = 30.0) -> dict[str, float]:
    """Poll until every one of ``workers`` reports 0 KV blocks in use (a request's blocks are freed
    when the engine thread handles its abort or finish, a moment after the HTTP answer); -> the last
    reading. Fails naming what was still held after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        seen = kv_blocks_in_use(base)
        if set(seen) >= workers and not any(seen[w] for w in workers):
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(f"KV blocks still in use after {timeout} s (leaked?): {seen}, "
                                 f"expected 0 on {sorted(workers)}")
        time.sleep(0.1)


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Nothing listens on ``host:port`` any more (a bind succeeds)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB, from /proc/<pid>/status."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def worker_id_of(pid: int) -> str:
    """The ``--worker-id`` a ``shoal.workers.server`` process was started with."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        args = f.read().decode().split("\0")
    return args[args.index("--worker-id") + 1]


def listening_ports(pid: int) -> set[int]:
    """The TCP ports ``pid`` listens on now (its socket inodes matched against /proc/net/tcp{,6})."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                    ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports
