"""etcd over TLS: ``https://`` endpoints, a client certificate for ``--client-cert-auth``, clear errors."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from shoal.cluster.etcd import EmbeddedEtcd, ServerTls, parse_endpoints
from shoal.cluster.etcd_tls import ENV_CACERT, ENV_CERT, ENV_KEY, EtcdTls
from shoal.cluster.registry import MembershipWatcher, WorkerRegistration, connect, list_workers, put_spec
from shoal.cluster.spec import DeploymentSpec
from shoal.workers.protocol import WorkerInfo

from .tls_support import make_pki


def run(coro, timeout: float = 30.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_etcd(tmp_path_factory, pki):
    """One member serving TLS and asking every client for a certificate of the test CA."""
    tls = ServerTls(pki.server_cert, pki.server_key, client_ca=pki.ca,
                    health_cert=pki.client_cert, health_key=pki.client_key)
    etcd = EmbeddedEtcd(tmp_path_factory.mktemp("etcd-tls") / "data", unsafe_no_fsync=True, tls=tls,
                        tls_server_ca=pki.ca)
    with etcd:
        yield etcd


@pytest.fixture
def client_env(monkeypatch, pki):
    monkeypatch.setenv(ENV_CACERT, pki.ca)
    monkeypatch.setenv(ENV_CERT, pki.client_cert)
    monkeypatch.setenv(ENV_KEY, pki.client_key)


def test_endpoint_schemes():
    assert parse_endpoints("https://a:1,https://b:2/") == [("a", 1), ("b", 2)]
    with pytest.raises(ValueError, match="mix https:// and plain"):
        parse_endpoints("https://a:1,b:2")
    with pytest.raises(ValueError, match=f"{ENV_CERT} and {ENV_KEY} go together"):
        EtcdTls.from_env({ENV_CERT: "/x.crt"})
    with pytest.raises(ValueError, match=f"{ENV_CACERT}=/no/such.crt"):
        EtcdTls("/no/such.crt").credentials()


def test_a_client_with_the_certificates_registers_and_watches_over_tls(tls_etcd, client_env):
    assert tls_etcd.endpoint.startswith("https://127.0.0.1:")

    async def go():
        client = await connect(tls_etcd.endpoint)
        seen = asyncio.Event()
        watcher = MembershipWatcher(client, "tls-demo", on_add=lambda r: seen.set(), on_remove=lambda w: None)
        await watcher.start()
        info = WorkerInfo(worker_id="w0", model="m", block_size=16, max_model_len=64, role="unified")
        async with WorkerRegistration(client, "tls-demo", info, "127.0.0.1:1", ttl_s=2):
            await asyncio.wait_for(seen.wait(), 10)
            assert [w.worker_id for w in await list_workers(client, "tls-demo")] == ["w0"]
        await watcher.stop()
        await client.close()

    run(go())


def test_without_a_client_certificate_the_server_refuses(tls_etcd, monkeypatch, pki):
    monkeypatch.setenv(ENV_CACERT, pki.ca)
    monkeypatch.delenv(ENV_CERT, raising=False)
    monkeypatch.delenv(ENV_KEY, raising=False)
    with pytest.raises(ConnectionError, match="no etcd endpoint answered"):
        run(connect(tls_etcd.endpoint, timeout_s=2.0))


def test_a_server_of_another_ca_is_not_trusted(tls_etcd, monkeypatch, pki, tmp_path):
    other = make_pki(tmp_path / "other", ca_name="another CA")
    monkeypatch.setenv(ENV_CACERT, other.ca)
    monkeypatch.setenv(ENV_CERT, pki.client_cert)
    monkeypatch.setenv(ENV_KEY, pki.client_key)
    with pytest.raises(ConnectionError, match="no etcd endpoint answered"):
        run(connect(tls_etcd.endpoint, timeout_s=2.0))


def test_plain_grpc_to_a_tls_member_fails_clearly(tls_etcd):
    plain = tls_etcd.endpoint.removeprefix("https://")
    with pytest.raises(ConnectionError, match="no etcd endpoint answered"):
        run(connect(plain, timeout_s=2.0))


def test_shoal_status_reaches_a_tls_etcd_through_the_variables(tls_etcd, client_env, pki):
    """A shoal command as a user runs it: only --etcd https://... and the three variables."""
    async def put():
        client = await connect(tls_etcd.endpoint)
        await put_spec(client, DeploymentSpec.from_yaml(
            "name: tls-demo\nmodel: smollm2-135m\npools: {unified: {replicas: 1}}\n"))
        await client.close()

    run(put())
    status = [sys.executable, "-m", "shoal.cluster.cli", "status", "--etcd", tls_etcd.endpoint]
    out = subprocess.run(status, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "tls-demo" in out.stdout
    env = {k: v for k, v in os.environ.items() if k != ENV_CERT and k != ENV_KEY}
    out = subprocess.run(status, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "no etcd endpoint answered" in out.stderr, out.stderr
