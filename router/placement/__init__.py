"""Placement policies: which worker serves a request (SGLang router / Ray Serve style).

One protocol, ``choose(request, workers) -> ranked worker ids``, and a name -> class registry::

    policy = make_policy("prefix_aware", block_size=16)
    ranked = policy.choose(PlacementRequest("r1", prompt_ids), views)
    policy.on_request_placed(request, ranked[0])

Torch-free: the router imports this.
"""

from .base import (BasePolicy, LoadWeights, PlacementPolicy, PlacementRequest, WorkerView,
                   available_policies, make_policy, register_policy)
from .least_load import LeastLoadPolicy
from .prefix_aware import PrefixAwarePolicy
from .prefix_index import PrefixIndex
from .round_robin import RoundRobinPolicy
from .session import HashRing, SessionPolicy

__all__ = [
    "BasePolicy", "HashRing", "LeastLoadPolicy", "LoadWeights", "PlacementPolicy", "PlacementRequest",
    "PrefixAwarePolicy", "PrefixIndex", "RoundRobinPolicy", "SessionPolicy", "WorkerView",
    "available_policies", "make_policy", "register_policy",
]
