"""A CPU KV cache larger than the host's free memory is refused at start, naming the option that
sized it, instead of swapping or being OOM-killed once requests fill it."""

from __future__ import annotations

import pytest

from shoal.workers.config import EngineConfig
from shoal.workers.device import check_host_kv_fits, host_memory_available
from shoal.workers.llm_engine import LLMEngine


def test_the_check_names_the_option_and_both_sizes():
    check_host_kv_fits(1 << 30, "kv_cache_memory_gb", available=2 << 30)
    with pytest.raises(ValueError, match=r"kv_cache_memory_gb: a CPU KV cache of 3.00 GiB does not fit in the "
                                         r"2.00 GiB of free host memory; lower kv_cache_memory_gb"):
        check_host_kv_fits(3 << 30, "kv_cache_memory_gb", available=2 << 30)


def test_an_engine_asked_for_more_kv_than_the_host_has_is_refused(tmp_path):
    free = host_memory_available()
    assert free is not None and free > 0  # Linux CI: /proc/meminfo is there
    gb = 2 * free / (1 << 30)  # twice what is free: can never fit
    with pytest.raises(ValueError, match="kv_cache_memory_gb: a CPU KV cache of .* does not fit"):
        LLMEngine(EngineConfig(model="tiny-smollm2-vocab", load_format="dummy", device="cpu", kv_cache_memory_gb=gb))
