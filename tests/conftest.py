"""Shared fixtures: tiny random HF checkpoints (the exact-match reference) and the real SmolLM2."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # shared helpers: tests/tiny_models.py
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from shoal.cluster.etcd import EmbeddedEtcd  # noqa: E402
from tiny_models import TINY_ARCHS, make_tiny_checkpoint  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))
if not torch.cuda.is_available():
    # Triton reads this when it is first imported: without a GPU its kernels run interpreted.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """arch -> (checkpoint dir, HF model) for every tiny architecture."""
    out = {}
    for arch in TINY_ARCHS:
        path = tmp_path_factory.mktemp(f"tiny-{arch}")
        out[arch] = (str(path), make_tiny_checkpoint(arch, path))
    return out


@pytest.fixture(scope="session")
def smollm2_path():
    from shoal.workers.models.files import smollm2_path

    return smollm2_path()


@pytest.fixture
def etcd_server(tmp_path):
    """A real etcd member on 127.0.0.1 (free client and peer ports, data in tmp_path), started;
    stopped after the test whatever happened (tests may stop and restart it themselves: ``stop()``
    then ``start()`` keeps its data dir and ports)."""
    server = EmbeddedEtcd(tmp_path / "etcd", unsafe_no_fsync=True)
    try:
        server.start(timeout=20.0)
        yield server
    finally:
        server.stop()
