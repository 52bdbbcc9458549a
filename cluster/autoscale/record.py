"""The latest autoscaling decision of a pool, as etcd keeps it: ``<prefix>/<deployment>/autoscale/<pool>``.

The live loop (:mod:`.live`) puts one JSON record per pool each tick; ``shoal status`` and the router's
``/metrics`` read them (desired vs current replicas, the reason and the policy's inputs). The key has no
lease: it goes with the deployment's other keys at ``shoal stop``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Mapping

from shoal.cluster.registry import DEFAULT_PREFIX, autoscale_key, autoscale_prefix


@dataclass(frozen=True)
class DecisionRecord:
    pool: str
    desired: int  # what the policy asked for
    current: int  # replicas counted when it asked (serving + starting)
    ready: int  # of those, serving
    policy: str
    reason: str
    inputs: Mapping[str, float] = field(default_factory=dict)  # the observation and the policy's figures
    time: float = 0.0  # wall-clock seconds (Unix epoch) of the decision

    def to_json(self) -> bytes:
        return json.dumps({**asdict(self), "inputs": dict(self.inputs)}, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> "DecisionRecord":
        return cls(**json.loads(data))


async def put_decision(client, deployment: str, record: DecisionRecord, prefix: str = DEFAULT_PREFIX) -> None:
    await client.put(autoscale_key(deployment, record.pool, prefix).encode(), record.to_json())


async def list_decisions(client, deployment: str, prefix: str = DEFAULT_PREFIX) -> dict[str, DecisionRecord]:
    """``pool -> its latest DecisionRecord``; a record that does not parse is left out."""
    out = {}
    for kv in await client.get_prefix(autoscale_prefix(deployment, prefix).encode()):
        try:
            record = DecisionRecord.from_json(kv.value)
        except (ValueError, TypeError):
            continue
        out[record.pool] = record
    return out
