"""Shared pieces of the Ray tests: a 2-node ``ray.cluster_utils.Cluster``, an asyncio loop in a thread
(the home of a controller and a router across a module's tests), and polling with a deadline."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pytest  # noqa: E402
import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402


class LoopThread:
    """An asyncio loop in a daemon thread."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="test-loop")
        self.thread.start()

    def run(self, coro, timeout: float = 120.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def wait_until(predicate, timeout: float, what: str, interval: float = 0.1) -> float:
    """Seconds it took for ``predicate()`` to hold; fails the test after ``timeout``."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, f"{what}: not within {timeout} s"
        time.sleep(interval)
    return time.monotonic() - start


def short_tmpdir(tag: str) -> Path:
    """A directory directly under /tmp: Ray's socket paths below it must fit in 107 bytes, which
    pytest's tmp_path (longer under xdist) does not guarantee. Callers remove it."""
    return Path(tempfile.mkdtemp(prefix=f"shoal-{tag}-", dir="/tmp"))


@contextlib.contextmanager
def two_node_cluster(num_cpus: int = 2, slots: tuple[int, int] = (1, 1)):
    """A head and one more node on 127.0.0.1 with ``slots`` of the ``slot`` resource; ``ray.init`` joined."""
    base = short_tmpdir("rt")
    temp = base / "ray"
    temp.mkdir()
    # Cluster writes its address to $RAY_TMPDIR/ray/ray_current_cluster (default /tmp/ray): keep it ours.
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_TMPDIR", str(base))
    common = dict(num_cpus=num_cpus, node_ip_address="127.0.0.1", temp_dir=str(temp))
    try:
        cluster = Cluster(initialize_head=True, head_node_args=dict(
            resources={"slot": slots[0]}, include_dashboard=False, **common))
    except Exception as e:  # the head did not come up: say why from its logs before they are removed
        mp.undo()
        logs = "\n".join(f"--- {f.name}:\n{f.read_text(errors='replace')[-2000:]}"
                         for f in sorted(temp.glob("session_*/logs/gcs_server*")) if f.is_file())
        shutil.rmtree(base, ignore_errors=True)
        raise RuntimeError(f"the Ray head did not start: {e}\n{logs or '(no GCS log)'}") from e
    try:
        cluster.add_node(resources={"slot": slots[1]}, **common)
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        mp.undo()
        shutil.rmtree(base, ignore_errors=True)
