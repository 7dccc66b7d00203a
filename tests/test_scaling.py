"""RoPE scaling: published reference values, an independent re-implementation of every formula, the
properties each method promises, and cached decoding that stays exact with scaling (dynamic NTK included).

Reference values: Hugging Face transformers 5.17 (see docs/references.md). The plain-Python formulas
below are written from the papers' definitions, deliberately without torch, so they share no code with
positions.rope_frequencies.
"""

import math
import random

import pytest
import torch
from conftest import tiny_config

from posenc.positions import RoPE, rope_cos_sin
from posenc.rope_scaling import ROPE_SCALING, check_scaling, rope_frequencies

L4K = 4096
IDX = [0, 8, 16, 24, 31]
REFERENCE = [  # (scaling, seq_len, attention_factor, inverse frequencies at IDX), d=64, base=1e4
    ({"rope_type": "linear", "factor": 4}, None, 1.0,
     [2.500000e-01, 2.500000e-02, 2.500000e-03, 2.500000e-04, 3.333804e-05]),
    ({"rope_type": "dynamic", "factor": 4, "original_max_position_embeddings": L4K}, 16384, 1.0,
     [1.000000e+00, 5.158587e-02, 2.661102e-03, 1.372752e-04, 1.025786e-05]),
    ({"rope_type": "dynamic", "factor": 4, "original_max_position_embeddings": L4K}, 8192, 1.0,
     [1.000000e+00, 6.601166e-02, 4.357539e-03, 2.876484e-04, 2.667043e-05]),
    ({"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": L4K}, None, 1.138629,
     [1.000000e+00, 1.000000e-01, 6.538462e-03, 2.500000e-04, 3.333804e-05]),
    ({"rope_type": "yarn", "factor": 8, "original_max_position_embeddings": L4K}, None, 1.207944,
     [1.000000e+00, 1.000000e-01, 5.961539e-03, 1.250000e-04, 1.666902e-05]),
    ({"rope_type": "llama3", "factor": 4, "low_freq_factor": 1, "high_freq_factor": 4,
      "original_max_position_embeddings": L4K}, None, 1.0,
     [1.000000e+00, 1.000000e-01, 1.000000e-02, 2.500000e-04, 3.333804e-05]),
]


@pytest.mark.parametrize("scaling, seq_len, attention_factor, expected", REFERENCE,
                         ids=[f"{r[0]['rope_type']}-x{r[0]['factor']}-{r[1]}" for r in REFERENCE])
def test_reference_values(scaling, seq_len, attention_factor, expected):
    inv_freq, factor = rope_frequencies(64, 1e4, scaling, seq_len)
    torch.testing.assert_close(inv_freq[IDX], torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=0)
    assert factor == pytest.approx(attention_factor, rel=1e-6)


@pytest.mark.parametrize("d, factor, base", [(64, 4, 41829.37), (128, 4, 40889.94), (128, 8, 82684.62)])
def test_ntk_aware_base(d, factor, base):
    scaling = {"rope_type": "ntk", "factor": factor, "original_max_position_embeddings": L4K}
    inv_freq, attention_factor = rope_frequencies(d, 1e4, scaling)
    recovered = inv_freq[1].item() ** (-d / 2)  # inv_freq[1] = base' ** (-2/d)
    assert recovered == pytest.approx(base, abs=0.01)
    assert attention_factor == 1.0


# ----------------------------------------------------------------------- an independent re-implementation

def ref_frequencies(d, b, scaling, seq_len=None):
    """The formulas of docs/references.md in plain Python floats: (list of inverse frequencies, attention_factor)."""
    def inv(base):
        return [base ** (-2 * i / d) for i in range(d // 2)]

    theta = inv(b)
    if scaling is None:
        return theta, 1.0
    kind, s = scaling["rope_type"], scaling["factor"]
    L = scaling.get("original_max_position_embeddings")
    if kind == "linear":
        return [t / s for t in theta], 1.0
    if kind == "ntk":
        return inv(b * s ** (d / (d - 2))), 1.0
    if kind == "dynamic":
        ell = max(seq_len or 0, L)
        return inv(b * ((s * ell / L) - (s - 1)) ** (d / (d - 2))), 1.0
    if kind == "yarn":
        def corr_dim(r):
            return d * math.log(L / (2 * math.pi * r)) / (2 * math.log(b))
        low, high = corr_dim(scaling.get("beta_fast", 32)), corr_dim(scaling.get("beta_slow", 1))
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, d - 1)
        if low == high:
            high += 0.001
        ramps = [min(max((i - low) / (high - low), 0.0), 1.0) for i in range(d // 2)]
        out = [t / s * r + t * (1 - r) for t, r in zip(theta, ramps)]
        return out, scaling.get("attention_factor", 0.1 * math.log(s) + 1)
    assert kind == "llama3"
    lo, hi = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    out = []
    for t in theta:
        wavelen = 2 * math.pi / t
        if wavelen < L / hi:
            out.append(t)
        elif wavelen > L / lo:
            out.append(t / s)
        else:
            gamma = (L / wavelen - lo) / (hi - lo)
            out.append((1 - gamma) * t / s + gamma * t)
    return out, 1.0


def random_scaling(rng):
    """One random but valid configuration: (d, base, scaling, seq_len)."""
    d = 2 * rng.randint(2, 128)
    base = 10 ** rng.uniform(2, 7)
    kind = rng.choice(["linear", "ntk", "dynamic", "yarn", "llama3"])
    factor = rng.choice([1.0, 2.0, 4.0, 8.0, 16.0, rng.uniform(1, 64)])
    L = rng.choice([16, 256, 2048, 4096, 8192, rng.randint(8, 100_000)])
    scaling = {"rope_type": kind, "factor": factor, "original_max_position_embeddings": L}
    if kind == "yarn":
        scaling["beta_fast"] = rng.uniform(4, 64)
        scaling["beta_slow"] = rng.uniform(0.25, 2)
        scaling["truncate"] = rng.random() < 0.5
        if rng.random() < 0.3:
            scaling["attention_factor"] = rng.uniform(0.5, 2)
    if kind == "llama3":
        scaling["low_freq_factor"] = rng.uniform(0.5, 2)
        scaling["high_freq_factor"] = scaling["low_freq_factor"] + rng.uniform(0.5, 8)
    seq_len = rng.choice([None, rng.randint(1, 4 * L), L, L + 1])
    return d, base, scaling, seq_len


def test_random_configurations_match_the_formulas():
    rng = random.Random(0)
    for _ in range(500):
        d, base, scaling, seq_len = random_scaling(rng)
        inv_freq, attention_factor = rope_frequencies(d, base, scaling, seq_len)
        expected, expected_factor = ref_frequencies(d, base, scaling, seq_len)
        msg = f"d={d} base={base} scaling={scaling} seq_len={seq_len}"
        torch.testing.assert_close(inv_freq, torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=0, msg=msg)
        assert attention_factor == pytest.approx(expected_factor, rel=1e-12), msg


def test_no_scaling_is_the_plain_rope_base():
    inv_freq, attention_factor = rope_frequencies(64, 1e4)
    torch.testing.assert_close(inv_freq, torch.tensor(ref_frequencies(64, 1e4, None)[0], dtype=torch.float64))
    assert attention_factor == 1.0


# ----------------------------------------------------------------------- what each method promises

def rope_scheme(scaling=None):
    return RoPE(tiny_config(n_head=2, block_size=16, rope_scaling=scaling))


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_linear_at_scaled_positions_equals_unscaled(factor):
    """Position Interpolation: the scaled model at position s*p is the unscaled model at p (q, k and scores)."""
    pos = torch.arange(0, 50)
    base_freq, _ = rope_frequencies(16, 1e4)
    scaled_freq, _ = rope_frequencies(16, 1e4, {"rope_type": "linear", "factor": factor})
    cos_p, sin_p = rope_cos_sin(pos, base_freq)
    cos_sp, sin_sp = rope_cos_sin(factor * pos, scaled_freq)
    torch.testing.assert_close(cos_sp, cos_p)
    torch.testing.assert_close(sin_sp, sin_p)

    # the scheme the model uses: same rotated q and k, hence the same attention scores
    plain, scaled = rope_scheme(), rope_scheme({"rope_type": "linear", "factor": factor})
    plain.prepare(50, "cpu")
    scaled.prepare(factor * 50, "cpu")
    q, k = torch.randn(2, 1, 2, 50, 16).unbind(0)  # (B, nh, T, hs) each
    q1, k1 = plain.rotate(q, k, pos, 0)
    q2, k2 = scaled.rotate(q, k, factor * pos, 0)
    torch.testing.assert_close(q2, q1)
    torch.testing.assert_close(k2, k1)
    torch.testing.assert_close(q2 @ k2.transpose(-1, -2), q1 @ k1.transpose(-1, -2))


def test_yarn_ramp_boundaries():
    """d=64, base 1e4, L=4096: corr_dim(32) = 10.47 -> low 10, corr_dim(1) = 22.51 -> high 23."""
    base, _ = rope_frequencies(64, 1e4)
    s = 4.0
    scaling = {"rope_type": "yarn", "factor": s, "original_max_position_embeddings": L4K}
    inv_freq, _ = rope_frequencies(64, 1e4, scaling)
    torch.testing.assert_close(inv_freq[:11], base[:11], rtol=1e-12, atol=0)  # ramp 0: extrapolate (kept)
    torch.testing.assert_close(inv_freq[23:], base[23:] / s, rtol=1e-12, atol=0)  # ramp 1: interpolate by s
    middle = slice(11, 23)
    assert ((inv_freq[middle] < base[middle]) & (inv_freq[middle] > base[middle] / s)).all()
    ramp = (base[middle] - inv_freq[middle]) / (base[middle] - base[middle] / s)  # recovered ramp
    torch.testing.assert_close(ramp, (torch.arange(11, 23, dtype=torch.float64) - 10) / 13)

    # truncate=False: the ramp runs between the exact correction dims 10.47 and 22.51
    loose, _ = rope_frequencies(64, 1e4, {**scaling, "truncate": False})
    low = 64 * math.log(L4K / (2 * math.pi * 32)) / (2 * math.log(1e4))
    high = 64 * math.log(L4K / (2 * math.pi)) / (2 * math.log(1e4))
    assert 10 < low < 11 and 22 < high < 23
    ramp = ((torch.arange(32, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    torch.testing.assert_close(loose, base / s * ramp + base * (1 - ramp), rtol=1e-12, atol=0)
    assert not torch.allclose(loose, inv_freq)


@pytest.mark.parametrize("factor", [1.5, 2, 4, 8, 16, 32])
def test_yarn_attention_factor(factor):
    scaling = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": L4K}
    _, attention_factor = rope_frequencies(64, 1e4, scaling)
    assert attention_factor == pytest.approx(0.1 * math.log(factor) + 1, rel=1e-12)
    _, explicit = rope_frequencies(64, 1e4, {**scaling, "attention_factor": 1.0})
    assert explicit == 1.0
    _, explicit = rope_frequencies(64, 1e4, {**scaling, "attention_factor": 0.7})
    assert explicit == 0.7


def test_yarn_attention_factor_reaches_the_model():
    """cos and sin are multiplied by the attention factor, so attention logits scale by its square."""
    scaling = {"rope_type": "yarn", "factor": 8, "original_max_position_embeddings": 16}
    scheme = rope_scheme(scaling)
    scheme.prepare(64, "cpu")
    mscale = 0.1 * math.log(8) + 1
    torch.testing.assert_close(scheme.cos[0], torch.full((8,), mscale))
    q, k = torch.randn(2, 1, 1, 1, 16).unbind(0)
    pos = torch.zeros(1, dtype=torch.long)
    qr, kr = scheme.rotate(q, k, pos, 0)  # position 0: no rotation, only the scale
    torch.testing.assert_close(qr @ kr.transpose(-1, -2), mscale ** 2 * (q @ k.transpose(-1, -2)))


def test_llama3_three_bands():
    """d=64, base 1e4, L=4096, low 1, high 4: wavelengths < 1024 kept (i <= 17), > 4096 divided by s
    (i >= 23), and the band between strictly in between."""
    s = 4.0
    base, _ = rope_frequencies(64, 1e4)
    scaling = {"rope_type": "llama3", "factor": s, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": L4K}
    inv_freq, attention_factor = rope_frequencies(64, 1e4, scaling)
    wavelen = 2 * math.pi / base
    high, low = wavelen < L4K / 4, wavelen > L4K / 1
    middle = ~high & ~low
    assert high.nonzero().flatten().tolist() == list(range(18))
    assert low.nonzero().flatten().tolist() == list(range(23, 32))
    torch.testing.assert_close(inv_freq[high], base[high], rtol=0, atol=0)
    torch.testing.assert_close(inv_freq[low], base[low] / s, rtol=1e-15, atol=0)
    assert ((inv_freq[middle] < base[middle]) & (inv_freq[middle] > base[middle] / s)).all()
    assert (inv_freq[middle].diff() < 0).all()  # still monotone through the blend
    assert attention_factor == 1.0


def test_dynamic_ntk_unchanged_up_to_the_original_length_and_growing_past_it():
    L = 4096
    scaling = {"rope_type": "dynamic", "factor": 4, "original_max_position_embeddings": L}
    base, _ = rope_frequencies(64, 1e4)
    for seq_len in (None, 1, 100, L - 1, L):
        inv_freq, _ = rope_frequencies(64, 1e4, scaling, seq_len)
        torch.testing.assert_close(inv_freq, base, rtol=0, atol=0)
    previous = base
    for seq_len in (L + 1, 2 * L, 4 * L, 8 * L):  # the base keeps growing: low frequencies keep falling
        inv_freq, _ = rope_frequencies(64, 1e4, scaling, seq_len)
        assert inv_freq[0] == 1.0 and (inv_freq[1:] < previous[1:]).all(), seq_len
        previous = inv_freq
    # at seq_len = k * L dynamic NTK is static NTK-aware scaling with factor s*k - (s - 1): 13 for s = k = 4
    ntk, _ = rope_frequencies(64, 1e4, {"rope_type": "ntk", "factor": 13, "original_max_position_embeddings": L})
    torch.testing.assert_close(rope_frequencies(64, 1e4, scaling, 4 * L)[0], ntk)


def test_dynamic_ntk_model_equals_unscaled_model_up_to_the_original_length(tiny):
    plain = tiny(block_size=16, vocab_size=64)
    dynamic = tiny(block_size=16, vocab_size=64,
                   rope_scaling={"rope_type": "dynamic", "factor": 4, "original_max_position_embeddings": 16})
    dynamic.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 64, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(dynamic(idx[:, :16])[0], plain(idx[:, :16])[0], rtol=0, atol=0)
        assert not torch.allclose(dynamic(idx)[0][:, -1], plain(idx)[0][:, -1], atol=1e-4)


# ----------------------------------------------------------------------- errors are one clear line

@pytest.mark.parametrize("kw, message", [
    (dict(pos_encoding="learned", rope_scaling={"rope_type": "linear", "factor": 4}),
     "learned positions cannot be scaled"),
    (dict(pos_encoding="alibi", rope_scaling={"rope_type": "linear", "factor": 4}), "ALiBi needs no scaling"),
    (dict(pos_encoding="sinusoidal", rope_scaling={"rope_type": "yarn", "factor": 4,
                                                   "original_max_position_embeddings": 16}), "sinusoidal"),
    (dict(rope_scaling={"rope_type": "no_such_rope_type", "factor": 4}), "unknown rope_type 'no_such_rope_type'"),
    (dict(rope_scaling={"rope_type": "linear", "factor": float("inf")}), "finite factor >= 1"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2, "beta_fast": 32}), "for rope_type 'linear'"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 2, "original_max_position_embeddings": 16.5}),
     "original_max_position_embeddings must be a positive integer"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 0.5}), "factor >= 1"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4}), "original_max_position_embeddings"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4, "beta_fats": 32,
                        "original_max_position_embeddings": 16}), "unknown rope_scaling key"),
])
def test_bad_scaling_fails_with_one_line(kw, message):
    with pytest.raises(ValueError, match=message) as e:
        tiny_config(**kw)
    assert "\n" not in str(e.value)


def test_rope_frequencies_rejects_bad_scaling_directly():
    with pytest.raises(ValueError, match="unknown rope_type"):
        rope_frequencies(64, 1e4, {"rope_type": "not_a_rope_type", "factor": 4})
    with pytest.raises(ValueError, match="factor >= 1"):
        rope_frequencies(64, 1e4, {"rope_type": "yarn", "factor": 0.25, "original_max_position_embeddings": 16})


def test_null_options_take_their_defaults():
    """As in Hugging Face configs, an optional key given as null (None) means its default."""
    given = {"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": L4K}
    nulls = {**given, "beta_fast": None, "beta_slow": None, "attention_factor": None, "truncate": None}
    assert check_scaling(nulls) == given
    (a, fa), (b, fb) = rope_frequencies(64, 1e4, nulls), rope_frequencies(64, 1e4, given)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert fa == fb
    with pytest.raises(ValueError, match="needs original_max_position_embeddings"):
        check_scaling({**given, "original_max_position_embeddings": None})  # required keys stay required


def test_every_registered_method_declares_what_the_model_asks():
    """A rope_type exists only as a registered function; each one runs through a model and says whether its
    frequencies depend on the length (only those change the model's cache key)."""
    for name, m in ROPE_SCALING.items():
        scaling = {"rope_type": name, "factor": 4.0, "original_max_position_embeddings": 16}
        scheme = rope_scheme(scaling)
        inv_freq, attention_factor = rope_frequencies(16, 1e4, scaling, 64)
        assert inv_freq.shape == (8,) and torch.isfinite(inv_freq).all() and attention_factor > 0
        keys = {scheme.cache_key(n) for n in (8, 16, 17, 64)}
        assert (len(keys) > 1) == m.length_dependent, name
