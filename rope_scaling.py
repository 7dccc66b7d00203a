"""RoPE scaling: the frequencies of a Hugging Face style `rope_scaling` dict, as one pure function.

linear = Position Interpolation (Chen et al. 2023), ntk = NTK-aware base change (bloc97 2023), dynamic =
NTK with the factor grown to the current length, yarn = YaRN (Peng et al. 2023), llama3 = Llama 3.1's
wavelength bands. Formulas and reference values: ../shared/REFERENCE.md. positions.RoPE uses it, and
positions re-exports it, so `from positions import rope_frequencies` works.
"""

import math

import torch

ROPE_TYPES = ("linear", "ntk", "dynamic", "yarn", "llama3")
SCALING_KEYS = {"rope_type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
                "attention_factor", "truncate", "low_freq_factor", "high_freq_factor"}


def check_scaling(scaling):
    """Validate a Hugging Face style `rope_scaling` dict (None passes); one clear ValueError line if wrong."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict) or set(scaling) - SCALING_KEYS:
        raise ValueError(f"unknown rope_scaling key(s) in {scaling!r}: use a dict with keys from {sorted(SCALING_KEYS)}")
    kind = scaling.get("rope_type")
    if kind not in ROPE_TYPES:
        raise ValueError(f"unknown rope_type {kind!r}; choose one of {', '.join(ROPE_TYPES)}")
    if not float(scaling.get("factor", 0)) >= 1.0:
        raise ValueError(f"rope_scaling needs a factor >= 1 (the context multiple), got {scaling.get('factor')!r}")
    if kind != "linear" and "original_max_position_embeddings" not in scaling:
        raise ValueError(f"rope_type {kind!r} needs original_max_position_embeddings (the training length)")
    return scaling


def rope_frequencies(head_dim, theta, scaling=None, seq_len=None):
    """Inverse frequencies (float64, head_dim/2) and attention_factor for RoPE with optional scaling.

    cos and sin get multiplied by attention_factor, so attention logits scale by its square (YaRN).
    `seq_len` matters only for dynamic NTK, whose base grows with the current length.
    """
    d = head_dim
    i = torch.arange(0, d, 2, dtype=torch.float64)
    inv_freq = theta ** (-i / d)
    if check_scaling(scaling) is None:
        return inv_freq, 1.0
    kind, s = scaling["rope_type"], float(scaling["factor"])
    L = scaling.get("original_max_position_embeddings")
    if kind == "linear":  # Position Interpolation: position m behaves like m / s
        return inv_freq / s, 1.0
    if kind == "ntk":  # NTK-aware: stretch the base so the lowest frequency interpolates by s
        return (theta * s ** (d / (d - 2))) ** (-i / d), 1.0
    if kind == "dynamic":  # NTK with the factor grown to the current length; unchanged up to L
        ell = max(seq_len or L, L)
        return (theta * ((s * ell / L) - (s - 1)) ** (d / (d - 2))) ** (-i / d), 1.0
    if kind == "yarn":
        return _yarn(inv_freq, d, theta, s, L, scaling)
    return _llama3(inv_freq, s, L, scaling)


def _yarn(inv_freq, d, theta, s, L, scaling):
    """YaRN: interpolate the low frequencies, keep the high ones, ramp between (by rotations per L)."""
    def correction_dim(rotations):  # the dimension that turns `rotations` times over L positions
        return d * math.log(L / (2 * math.pi * rotations)) / (2 * math.log(theta))

    low, high = correction_dim(scaling.get("beta_fast", 32)), correction_dim(scaling.get("beta_slow", 1))
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    high += 0.001 if low == high else 0  # avoid a division by zero in the ramp
    ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)  # 0 = keep, 1 = interpolate
    attention_factor = scaling.get("attention_factor") or (0.1 * math.log(s) + 1.0 if s > 1 else 1.0)
    return inv_freq / s * ramp + inv_freq * (1 - ramp), float(attention_factor)


def _llama3(inv_freq, s, L, scaling):
    """Llama 3: keep short wavelengths, divide long ones by s, blend the band between."""
    low_ff, high_ff = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    wavelen = 2 * math.pi / inv_freq
    gamma = ((L / wavelen - low_ff) / (high_ff - low_ff)).clamp(0, 1)  # 1 = keep, 0 = interpolate
    blended = (1 - gamma) * inv_freq / s + gamma * inv_freq
    out = torch.where(wavelen > L / low_ff, inv_freq / s, blended)
    return torch.where(wavelen < L / high_ff, inv_freq, out), 1.0
