"""RoPE scaling: a registry from Hugging Face's `rope_type` to one function that gives the frequencies.

linear = Position Interpolation (Chen et al. 2023), ntk = NTK-aware base change (bloc97 2023), dynamic = NTK
with the factor grown to the current length, yarn = YaRN (Peng et al. 2023), llama3 = Llama 3.1's wavelength
bands, longrope = LongRoPE's per-pair factors (Ding et al. 2024; Phi-3), proportional = p-RoPE (Barbero et al.
2024; Gemma); and two that fine-tuning needs
beside them: direct = no scaling at all (the control PI compares against), abf = a larger base (Xiong et al.
2023, Llama 2 Long). Formulas and reference values: docs/references.md.

Adding a method is one decorated function: `@method("name", "label", options={...})` declares its optional
keys (with their defaults), whether it needs `original_max_position_embeddings`, and whether its frequencies
depend on the current length (then cached keys go stale as the sequence grows, and the model recomputes them).
Options listed in `per_pair` are lists with one number per rotary pair (LongRoPE's factors); a method with
`whole_head` gives frequencies for every pair of the head itself (zeros for pairs it leaves unrotated), so the
model must rotate the whole head (rotary_fraction 1).
"""

import math
from dataclasses import dataclass
from typing import Callable

import torch

COMMON_KEYS = ("rope_type", "factor", "original_max_position_embeddings")


@dataclass(frozen=True)
class ScalingMethod:
    frequencies: Callable  # (inv_freq, *, d, theta, factor, original_len, seq_len, **options) -> (inv_freq, attn factor)
    options: dict  # optional keys -> default; a key given as null takes its default (as Hugging Face does)
    needs_original_len: bool  # original_max_position_embeddings (the training length) is required
    length_dependent: bool  # the frequencies change with the current sequence length
    label: str  # the name papers and reports use
    per_pair: tuple = ()  # option keys whose value is a list of positive numbers, one per rotary pair
    whole_head: bool = False  # its frequencies cover every pair of the head: needs rotary_fraction = 1


ROPE_SCALING: dict[str, ScalingMethod] = {}  # rope_type -> method; a type without a function cannot exist


def method(name, label=None, options=None, needs_original_len=True, length_dependent=False, per_pair=(),
           whole_head=False):
    """Register a scaling function under a rope_type."""
    def register(fn):
        ROPE_SCALING[name] = ScalingMethod(fn, dict(options or {}), needs_original_len, length_dependent, label or name,
                                           tuple(per_pair), whole_head)
        return fn
    return register


def check_scaling(scaling):
    """A Hugging Face style `rope_scaling` dict, checked, with null options dropped (None passes).
    Raises one clear ValueError line naming what is wrong."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling must be a dict like {{\"rope_type\": \"yarn\", \"factor\": 4, ...}}, got {scaling!r}")
    kind = scaling.get("rope_type")
    if kind not in ROPE_SCALING:
        raise ValueError(f"unknown rope_type {kind!r}; choose one of {', '.join(ROPE_SCALING)}")
    m = ROPE_SCALING[kind]
    unknown = set(scaling) - set(COMMON_KEYS) - set(m.options)
    if unknown:
        raise ValueError(f"unknown rope_scaling key(s) {sorted(unknown)} for rope_type {kind!r}: it takes "
                         f"{', '.join(COMMON_KEYS + tuple(m.options))}")
    factor = scaling.get("factor")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 1.0 <= factor < math.inf:
        raise ValueError(f"rope_scaling needs a finite factor >= 1 (the context multiple), got {factor!r}")
    L = scaling.get("original_max_position_embeddings")
    if L is None and m.needs_original_len:
        raise ValueError(f"rope_type {kind!r} needs original_max_position_embeddings (the training length)")
    if L is not None and (isinstance(L, bool) or not isinstance(L, int) or L < 1):
        raise ValueError(f"original_max_position_embeddings must be a positive integer, got {L!r}")
    for key in m.per_pair:
        value = scaling.get(key)
        if value is not None and (not isinstance(value, (list, tuple)) or not value or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x < math.inf for x in value)):
            raise ValueError(f"rope_scaling {key} for rope_type {kind!r} must be a list of positive numbers "
                             f"(one per rotary pair), got {value!r}")
    for key, default in m.options.items():
        value = scaling.get(key)
        if key not in m.per_pair and value is not None and (isinstance(value, bool) != isinstance(default, bool)
                                  or not isinstance(value, (int, float)) or not math.isfinite(value)):
            raise ValueError(f"bad rope_scaling value {key}={value!r} for rope_type {kind!r}")
    return {k: ([float(x) for x in v] if k in m.per_pair else v) for k, v in scaling.items() if v is not None}


def rope_frequencies(head_dim, theta, scaling=None, seq_len=None):
    """Inverse frequencies (float64, head_dim/2) and attention_factor for RoPE with optional scaling.

    cos and sin get multiplied by attention_factor, so attention logits scale by its square (YaRN).
    `seq_len` matters only for methods whose frequencies depend on the current length (dynamic NTK, LongRoPE).
    Raises ValueError (one line) for options that do not fit head_dim (LongRoPE's per-pair factors).
    """
    d = head_dim
    inv_freq = inverse_frequencies(theta, d)
    scaling = check_scaling(scaling)
    if scaling is None:
        return inv_freq, 1.0
    m = ROPE_SCALING[scaling["rope_type"]]
    options = {k: scaling.get(k, default) for k, default in m.options.items()}
    inv_freq, attention_factor = m.frequencies(
        inv_freq, d=d, theta=theta, factor=float(scaling["factor"]), seq_len=seq_len,
        original_len=scaling.get("original_max_position_embeddings"), **options)
    return inv_freq, float(attention_factor)


def inverse_frequencies(theta, d):
    """theta^(-2i/d), i = 0 .. d/2 - 1, in float64."""
    return theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)


def scaling_dict(method_name, factor, original_len, **options):
    """The checked rope_scaling dict that extends a model trained at original_len by factor."""
    return check_scaling({"rope_type": method_name, "factor": float(factor),
                          "original_max_position_embeddings": int(original_len), **options})


def original_length(rope_scaling, block_size):
    """The length the weights were first trained at: a scaled model keeps original_max_position_embeddings."""
    return int((rope_scaling or {}).get("original_max_position_embeddings") or block_size)


def length_dependent(scaling):
    """True if this scaling's frequencies change with the sequence length (dynamic NTK, LongRoPE)."""
    return scaling is not None and ROPE_SCALING[scaling["rope_type"]].length_dependent


# ----------------------------------------------------------------------------- the methods

@method("linear", "PI", needs_original_len=False)
def linear(inv_freq, *, factor, **_):
    """Position Interpolation: position m behaves like m / factor."""
    return inv_freq / factor, 1.0


@method("ntk", "NTK")
def ntk(inv_freq, *, d, theta, factor, **_):
    """NTK-aware: stretch the base so that the lowest frequency interpolates by the factor."""
    return inverse_frequencies(theta * factor ** (d / (d - 2)), d), 1.0


@method("dynamic", "dynamic NTK", length_dependent=True)
def dynamic(inv_freq, *, d, theta, factor, original_len, seq_len, **_):
    """NTK with the factor grown to the current length; unchanged up to the original length."""
    ell = max(seq_len or original_len, original_len)
    return inverse_frequencies(theta * ((factor * ell / original_len) - (factor - 1)) ** (d / (d - 2)), d), 1.0


@method("yarn", "YaRN", options={"beta_fast": 32, "beta_slow": 1, "truncate": True, "attention_factor": None})
def yarn(inv_freq, *, d, theta, factor, original_len, beta_fast, beta_slow, truncate, attention_factor, **_):
    """YaRN: interpolate the low frequencies, keep the high ones, ramp between (by rotations per L)."""
    def correction_dim(rotations):  # the dimension that turns `rotations` times over L positions
        return d * math.log(original_len / (2 * math.pi * rotations)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    high += 0.001 if low == high else 0  # avoid a division by zero in the ramp
    ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)  # 0 = keep, 1 = interpolate
    attention_factor = attention_factor or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
    return inv_freq / factor * ramp + inv_freq * (1 - ramp), attention_factor


@method("llama3", "Llama-3", options={"low_freq_factor": 1.0, "high_freq_factor": 4.0})
def llama3(inv_freq, *, factor, original_len, low_freq_factor, high_freq_factor, **_):
    """Llama 3: keep short wavelengths, divide long ones by the factor, blend the band between."""
    L, wavelen = original_len, 2 * math.pi / inv_freq
    gamma = ((L / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)).clamp(0, 1)  # 1 = keep
    blended = (1 - gamma) * inv_freq / factor + gamma * inv_freq
    out = torch.where(wavelen > L / low_freq_factor, inv_freq / factor, blended)
    return torch.where(wavelen < L / high_freq_factor, inv_freq, out), 1.0


def longrope_factors(scaling, d):
    """LongRoPE's (short_factor, long_factor) lists for d rotated dims. Missing ones default to no change (1) up to
    the original length and to Position Interpolation (factor) past it: the start of the factor search."""
    short, long = scaling.get("short_factor"), scaling.get("long_factor")
    short = list(short) if short is not None else [1.0] * (d // 2)
    long = list(long) if long is not None else [float(scaling["factor"])] * (d // 2)
    for key, value in (("short_factor", short), ("long_factor", long)):
        if len(value) != d // 2:
            raise ValueError(f"rope_scaling {key} has {len(value)} values; this model has {d // 2} rotary pairs "
                             f"({d} rotated dims), one factor each")
    return short, long


@method("longrope", "LongRoPE", options={"short_factor": None, "long_factor": None, "attention_factor": None},
        length_dependent=True, per_pair=("short_factor", "long_factor"))
def longrope(inv_freq, *, d, factor, original_len, seq_len, attention_factor, **options):
    """LongRoPE: pair i's frequency divided by its own factor, the short ones up to the original length and the
    long ones past it (for the whole sequence: Hugging Face switches on the current length). attention_factor
    defaults to sqrt(1 + ln s / ln L), 1 when s <= 1."""
    short, long = longrope_factors({"factor": factor, **options}, d)
    ext = long if seq_len is not None and seq_len > original_len else short
    if attention_factor is None:
        if factor > 1 and original_len < 2:
            raise ValueError("rope_type 'longrope' needs original_max_position_embeddings >= 2 for its attention "
                             "factor sqrt(1 + ln s / ln L); or give attention_factor")
        attention_factor = math.sqrt(1 + math.log(factor) / math.log(original_len)) if factor > 1 else 1.0
    return inv_freq / torch.tensor(ext, dtype=torch.float64), attention_factor


@method("proportional", "p-RoPE", options={"partial_rotary_factor": 1.0}, needs_original_len=False, whole_head=True)
def proportional(inv_freq, *, d, factor, partial_rotary_factor, **_):
    """p-RoPE: the first floor(p * head_dim / 2) pairs keep head_dim's frequencies theta^(-2i/head_dim), the rest get
    frequency 0 (they pass through unrotated, in the half pairing of the whole head), then all are divided by the
    factor. Not our partial rotary (rotary_fraction p), which rotates the first p * head_dim dims, pairs i with
    i + p * head_dim / 2, and spreads theta^(-2i/(p * head_dim)) over them: the same as p-RoPE only with theta^p
    for theta and the kept dims moved together (tests/test_scaling.py shows both)."""
    if not 0 <= partial_rotary_factor <= 1:
        raise ValueError(f"rope_type 'proportional' needs partial_rotary_factor in [0, 1] (the rotated fraction of "
                         f"the pairs), got {partial_rotary_factor!r}")
    kept = int(partial_rotary_factor * d // 2)  # as transformers rounds it
    return torch.cat((inv_freq[:kept], torch.zeros(d // 2 - kept, dtype=torch.float64))) / factor, 1.0


# ----------------------------------------------------------------------------- fine-tuning recipes as methods
# Both keep plain RoPE's form (so a checkpoint exports as the default rope type, hf.rope_parameters), and both
# record original_max_position_embeddings, so every report knows the length the weights were first trained at.

@method("direct", "direct (no scaling)")
def direct(inv_freq, **_):
    """No scaling: RoPE fine-tuned at the target length as it is, the control of PI's paper (without it nobody
    can tell whether interpolation is what rescues the model)."""
    return inv_freq, 1.0


ABF_COEFFICIENT, ABF_EXPONENT = 0.0424, 1.628  # Xu et al. (NeurIPS 2024): base >= 0.0424 * L^1.628


def abf_base(target_len):
    """The smallest RoPE base that a context of target_len tokens needs, by Xu et al.'s lower bound."""
    return ABF_COEFFICIENT * target_len ** ABF_EXPONENT


@method("abf", "ABF", options={"base": None})
def abf(inv_freq, *, d, factor, original_len, base, **_):
    """Adjusted base frequency: plain RoPE with a new base; None: Xu et al.'s bound for factor * original_len."""
    return inverse_frequencies(base or abf_base(factor * original_len), d), 1.0
