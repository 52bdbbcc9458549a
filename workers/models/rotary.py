"""The rotary embedding's cos/sin cache, with Llama 3 frequency scaling baked in.

Kernels only read the cache (``[max_position, head_dim]``: cos then sin), so scaling schemes live here.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch


def inverse_frequencies(head_dim: int, theta: float, scaling: Mapping[str, Any] | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    # llama3: long wavelengths slow down by `factor`, short ones stay, the band between blends smoothly.
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    original = scaling.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = original / low, original / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def cos_sin_cache(head_dim: int, max_position: int, theta: float,
                  scaling: Mapping[str, Any] | None = None) -> torch.Tensor:
    """``[max_position, head_dim]`` fp32: ``cos(p * f)`` for the first half, ``sin(p * f)`` for the second."""
    inv_freq = inverse_frequencies(head_dim, theta, scaling)
    freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)
