"""TLS to etcd: ``https://`` endpoints, with the certificates named by etcdctl-style environment variables.

An endpoint list is either all ``https://`` (TLS) or all plain (``http://`` or ``host:port``); a mix is
refused. With TLS, the client reads:

* ``SHOAL_ETCD_CACERT``: the CA bundle that signed etcd's server certificate (unset: the system roots);
* ``SHOAL_ETCD_CERT`` and ``SHOAL_ETCD_KEY``: a client certificate and its key, for an etcd started with
  ``--client-cert-auth`` (both or neither).

Environment variables, not flags, because every process that talks to etcd needs them — the launcher,
the routers, and the Ray worker actors on every node, which inherit their node's environment (the Helm
chart mounts one Secret and sets the three variables on every pod). They are read when a client
connects, so a renewed certificate is picked up by the next connection.

aetcd 1.0 opens only insecure channels; :class:`SecureClient` is its client over a TLS channel.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

import aetcd
import grpc
from aetcd import rpc, watcher

ENV_CACERT = "SHOAL_ETCD_CACERT"
ENV_CERT = "SHOAL_ETCD_CERT"
ENV_KEY = "SHOAL_ETCD_KEY"


def endpoints_use_tls(items: list[str]) -> bool:
    """True if every endpoint is ``https://``, False if none is; a mix is a ValueError."""
    secure = [item.strip().startswith("https://") for item in items]
    if any(secure) and not all(secure):
        raise ValueError(f"etcd endpoints {','.join(items)!r} mix https:// and plain ones: "
                         "use one scheme for all members")
    return bool(secure) and all(secure)


@dataclass(frozen=True)
class EtcdTls:
    """Where the client's TLS material is (paths; None: not given)."""

    cacert: str | None = None
    cert: str | None = None
    key: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError(f"etcd TLS: {ENV_CERT} and {ENV_KEY} go together (a client certificate "
                             f"and its key); got only {ENV_CERT if self.cert else ENV_KEY}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "EtcdTls":
        return cls(env.get(ENV_CACERT) or None, env.get(ENV_CERT) or None, env.get(ENV_KEY) or None)

    def credentials(self) -> grpc.ChannelCredentials:
        """gRPC channel credentials from the files; an unreadable one is a ValueError naming its variable."""
        return grpc.ssl_channel_credentials(root_certificates=_read(ENV_CACERT, self.cacert),
                                            private_key=_read(ENV_KEY, self.key),
                                            certificate_chain=_read(ENV_CERT, self.cert))


def _read(variable: str, path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"etcd TLS: {variable}={path}: {e.strerror}") from None


class SecureClient(aetcd.Client):
    """An aetcd client whose channel is TLS with ``credentials``; everything else is aetcd's."""

    def __init__(self, host: str, port: int, *, credentials: grpc.ChannelCredentials, **kwargs) -> None:
        super().__init__(host, port, **kwargs)
        self._credentials = credentials

    async def connect(self) -> None:
        # aetcd.Client.connect with its one insecure_channel call made secure (no user/password auth:
        # TLS client certificates are the authentication here).
        if self._connected.is_set():
            return
        self.channel = grpc.aio.secure_channel(f"{self._host}:{self._port}", self._credentials,
                                               options=list(self._options.items()))
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata)
        self._connected.set()
