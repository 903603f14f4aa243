"""RoPE tables: the cos and sin of every position's rotation angles, Llama 3.1's frequency
scaling included. The model builds them once per length (Llama.rope); the attention kernels
read them (half-rotation layout)."""
import math

import torch


def rope_tables(config, max_seq_len, device=None):
    """cos and sin of shape (max_seq_len, head_dim / 2), float32, half-rotation layout."""
    exponents = torch.arange(0, config.head_dim, 2, device=device).float() / config.head_dim
    inv_freq = 1.0 / config.rope_theta ** exponents
    if config.rope_scaling and config.rope_scaling.get("rope_type") == "llama3":
        inv_freq = _llama3_scaled(inv_freq, config.rope_scaling)
    angles = torch.outer(torch.arange(max_seq_len, device=device).float(), inv_freq)
    return angles.cos(), angles.sin()


def _llama3_scaled(inv_freq, s):
    """Llama 3.1: slow down long wavelengths by `factor`, keep short ones, blend between."""
    old_context = s["original_max_position_embeddings"]
    low_wavelen = old_context / s.get("low_freq_factor", 1.0)
    high_wavelen = old_context / s.get("high_freq_factor", 4.0)
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_context / wavelen - s.get("low_freq_factor", 1.0)) / (
        s.get("high_freq_factor", 4.0) - s.get("low_freq_factor", 1.0))
    blended = (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s["factor"], blended)
    return torch.where(wavelen < high_wavelen, inv_freq, scaled)
