"""Where async scheduling is on when the user leaves it unset: CUDA at one rank only."""

import torch

from shoal.workers.config import EngineConfig
from shoal.workers.llm_engine import resolve_async_scheduling


def test_unset_is_on_for_cuda_at_one_rank_and_off_elsewhere():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_async_scheduling(EngineConfig(model="m"), cuda) is True
    assert resolve_async_scheduling(EngineConfig(model="m"), cpu) is False
    assert resolve_async_scheduling(EngineConfig(model="m", tensor_parallel_size=2), cuda) is False


def test_a_set_value_wins():
    assert resolve_async_scheduling(EngineConfig(model="m", async_scheduling=False), torch.device("cuda")) is False
    assert resolve_async_scheduling(EngineConfig(model="m", async_scheduling=True), torch.device("cpu")) is True
