"""``ray`` for the chart in miniature: Ray's own CLI, with the pods' two nodes kept on loopback.

On Linux, ``ray start --node-ip-address=127.0.0.1`` swaps 127.0.0.1 for the machine's own address.
Ray keeps loopback only with multi-node clusters off (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``), and
then refuses a second node's ``ray start --address``. In a pod the address would be the pod's IP; here
it must stay 127.0.0.1, so every miniature process runs with that variable at 0 (Ray's own processes
then resolve this host to loopback), and this wrapper alone — the ``ray start`` of the head and the
worker pod — keeps ``--node-ip-address`` as given and allows the second node on one host.
Test scaffolding only: shoal itself never touches these Ray internals.

    python tests/helm/ray_cli.py start --address=127.0.0.1:6379 --node-ip-address=127.0.0.1 ...
"""

import sys

from ray._private import ray_constants, services
from ray.scripts.scripts import main

services.resolve_ip_for_localhost = lambda host: host
ray_constants.ENABLE_RAY_CLUSTER = True

if __name__ == "__main__":
    sys.exit(main())
