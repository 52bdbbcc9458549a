"""Autoscaling: pure policy objects (pool observation in, desired replicas out), the worker profile and
capacity model the ``slo`` policy predicts from, and a discrete-event simulator (``sim/``).

    policy = make_policy("slo", Bounds(1, 8), ttft_s=2.0, itl_s=0.15)
    decision = policy.decide(PoolObservation(now=t, pool="unified", ready_replicas=2, arrival_rate=3.5))

Torch-free: the router and the controller import it.
"""

from . import queue, slo, static, target  # noqa: F401  (register the policies)
from .base import (Bounds, Decision, Policy, PoolObservation, available_policies, check_policy_options,
                   make_policy, policy_config_class, policy_options)
from .capacity import CapacityModel, Mix, Slo
from .profile import Profile

__all__ = ["Bounds", "CapacityModel", "Decision", "Mix", "Policy", "PoolObservation", "Profile", "Slo",
           "available_policies", "check_policy_options", "make_policy", "policy_config_class", "policy_options"]
