"""``etcd_server``: a real etcd member on 127.0.0.1 (free client and peer ports, data in tmp_path)."""

from __future__ import annotations

import pytest

from shoal.cluster.etcd import EmbeddedEtcd


@pytest.fixture
def etcd_server(tmp_path):
    """A started ``EmbeddedEtcd``; stopped after the test whatever happened (tests may stop and
    restart it themselves: ``stop()`` then ``start()`` keeps its data dir and ports)."""
    server = EmbeddedEtcd(tmp_path / "etcd", unsafe_no_fsync=True)
    try:
        server.start(timeout=20.0)
        yield server
    finally:
        server.stop()
