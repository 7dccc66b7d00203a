"""Properties of the position schemes themselves: formulas, published values, invariances, precision."""

import math

import pytest
import torch
from conftest import tiny_config
from torch.testing import assert_close

from posenc.positions import (ALiBi, Sinusoidal, alibi_slopes, apply_rope, permute_rope_layout, rope_cos_sin,
                              sinusoidal_table)
from posenc.rope_scaling import rope_frequencies


@pytest.mark.parametrize("n_head, expected", [
    (8, [2.0 ** -(h + 1) for h in range(8)]),
    (12, [2.0 ** -(h + 1) for h in range(8)] + [0.707107, 0.353553, 0.176777, 0.088388]),
    (6, [0.25, 0.0625, 0.015625, 0.003906, 0.5, 0.125]),
])
def test_alibi_slopes_match_published_values(n_head, expected):
    assert_close(torch.tensor(alibi_slopes(n_head)), torch.tensor(expected), atol=1e-6, rtol=0)


def test_alibi_bias_depends_only_on_distance():
    scheme = ALiBi(tiny_config(pos_encoding="alibi", n_head=8))
    pos = torch.arange(40)
    bias = scheme.attn_bias(pos, pos, 0)  # (nh, T, T)
    shifted = scheme.attn_bias(pos + 1000, pos + 1000, 0)
    assert_close(bias, shifted)
    for h, m in enumerate(alibi_slopes(8)):
        i, j = 30, 7
        assert bias[h, i, j].item() == pytest.approx(-m * (i - j))
        assert bias[h, i, j].item() == pytest.approx(bias[h, i + 5, j + 5].item())


@pytest.mark.parametrize("base", [10000, 1e7])
def test_sinusoidal_equals_formula(tiny, base):
    C, pos = 16, torch.tensor([0, 1, 7, 300, 4097])
    scheme = tiny(pos_encoding="sinusoidal", n_embd=C, n_head=2, pos_options={"base": base}).transformer.pos
    scheme.prepare(4098, torch.device("cpu"))
    table = scheme.embed(pos) / scheme.scale
    for r, p in enumerate(pos.tolist()):
        for i in range(C // 2):
            assert table[r, 2 * i].item() == pytest.approx(math.sin(p / base ** (2 * i / C)), abs=1e-6)
            assert table[r, 2 * i + 1].item() == pytest.approx(math.cos(p / base ** (2 * i / C)), abs=1e-6)


@pytest.mark.parametrize("base", [1, -5, True, "big"])
def test_a_bad_sinusoidal_base_is_one_line(tiny, base):
    with pytest.raises(ValueError, match="bad pos_options value .* for 'base' of sinusoidal"):
        tiny(pos_encoding="sinusoidal", pos_options={"base": base})


def test_sinusoidal_positions_are_the_size_of_a_fresh_token_embedding(tiny):
    model = tiny(pos_encoding="sinusoidal", n_embd=64)
    scheme = model.transformer.pos
    scheme.prepare(1024, torch.device("cpu"))
    pos = torch.arange(1024)
    assert_close(scheme.embed(pos), sinusoidal_table(pos, 64) * scheme.scale)  # the formula, scaled
    token_rms = model.transformer.wte.weight.pow(2).mean().sqrt().item()
    assert scheme.embed(pos).pow(2).mean().sqrt().item() == pytest.approx(token_rms, rel=0.05)


@pytest.mark.parametrize("factor", [2, 4])
def test_sinusoidal_linear_scaling_interpolates_positions(factor):
    """Position Interpolation on the sinusoidal table: the scaled scheme at position s*p is the plain one at p."""
    plain = Sinusoidal(tiny_config(pos_encoding="sinusoidal"))
    scaled = Sinusoidal(tiny_config(pos_encoding="sinusoidal", rope_scaling={"rope_type": "linear", "factor": factor}))
    plain.prepare(64, torch.device("cpu"))
    scaled.prepare(64 * factor, torch.device("cpu"))
    p = torch.arange(64)
    assert_close(scaled.embed(factor * p), plain.embed(p))
    assert not torch.allclose(scaled.embed(p[1:]), plain.embed(p[1:]))


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_rope_score_depends_only_on_relative_position(layout):
    d = 16
    inv_freq, _ = rope_frequencies(d, 10000.0)
    q, k = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)

    def score(m, n):
        angles = torch.tensor([m, n], dtype=torch.float64)[:, None] * inv_freq[None]
        cos, sin = angles.cos(), angles.sin()
        rq = apply_rope(q[None], cos[:1], sin[:1], layout)
        rk = apply_rope(k[None], cos[1:], sin[1:], layout)
        return (rq * rk).sum().item()

    for m, n in [(5, 2), (105, 102), (30002, 29999)]:
        assert score(m, n) == pytest.approx(score(3, 0), abs=1e-9)
    assert score(9, 2) != pytest.approx(score(3, 0), abs=1e-6)


def test_rope_fp32_tables_match_float64_reference_up_to_32k():
    inv_freq, _ = rope_frequencies(64, 10000.0)
    pos = torch.arange(0, 32769, 7)
    cos, sin = rope_cos_sin(pos, inv_freq)
    assert cos.dtype == torch.float32
    angles = pos.double()[:, None] * inv_freq[None]
    assert_close(cos.double(), angles.cos(), atol=1e-7, rtol=0)
    assert_close(sin.double(), angles.sin(), atol=1e-7, rtol=0)


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_rope_tables_equal_transformers_to_its_float32_rounding_and_are_exact_at_32k(theta):
    """Against transformers' own RoPE (GPTNeoXRotaryEmbedding, our export target), head_dim 64, positions to 32k:
    - the frequencies are theirs to two float32 roundings (their power and reciprocal run in float32);
    - the cos/sin tables differ from theirs by no more than their float32 angles can be off (pos * inv_freq rounded
      twice, inv_freq <= 1: 2.4e-7 per position), so a wrong frequency or position shows at every length;
    - and at 32k ours are within 1e-7 of the float64 truth (Python's math, one pair at a time) while theirs are off
      by more than 1e-4: the table precision bug fp32 angles cause, which ours does not have."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding
    config = transformers.GPTNeoXConfig(hidden_size=128, num_attention_heads=2, max_position_embeddings=32768,
                                        rope_parameters={"rope_type": "default", "rope_theta": theta,
                                                         "partial_rotary_factor": 1.0})
    theirs = GPTNeoXRotaryEmbedding(config)
    inv_freq, _ = rope_frequencies(64, theta)
    assert_close(inv_freq, theirs.inv_freq.double(), rtol=2.4e-7, atol=0)
    pos = torch.arange(0, 32769, 7)
    their_cos, their_sin = (t[0, :, :32].double() for t in theirs(torch.zeros(1), pos[None]))  # (T, 32): halves repeat
    cos, sin = (t.double() for t in rope_cos_sin(pos, inv_freq))
    allowed = 2e-7 + 2.4e-7 * pos.double()[:, None]
    assert ((cos - their_cos).abs() <= allowed).all() and ((sin - their_sin).abs() <= allowed).all()
    far = pos[-1].item()  # 32767
    exact = torch.tensor([[f(far * theta ** (-2 * i / 64)) for i in range(32)] for f in (math.cos, math.sin)])
    assert_close(torch.stack((cos[-1], sin[-1])), exact.double(), atol=1e-7, rtol=0)
    assert (torch.stack((their_cos[-1], their_sin[-1])) - exact).abs().max() > 1e-4


def test_partial_rotary_leaves_unrotated_dims_unchanged():
    hs, rot = 16, 4
    inv_freq, _ = rope_frequencies(rot, 10000.0)
    cos, sin = rope_cos_sin(torch.arange(10), inv_freq)
    x = torch.randn(2, 3, 10, hs)
    y = apply_rope(x, cos, sin, "half")
    assert_close(y[..., rot:], x[..., rot:], atol=0, rtol=0)
    assert not torch.allclose(y[..., :rot], x[..., :rot])
    assert_close(y[..., 0, :rot], x[..., 0, :rot])  # position 0 is the identity rotation


@pytest.mark.parametrize("rotary_fraction", [1.0, 0.5])
def test_half_and_interleaved_agree_after_weight_permutation(rotary_fraction, tiny):
    a = tiny(pos_encoding="rope", rope_layout="half", rotary_fraction=rotary_fraction)
    b = tiny(pos_encoding="rope", rope_layout="interleaved", rotary_fraction=rotary_fraction)
    half = a.config
    idx = torch.randint(0, 128, (2, 32))
    b.load_state_dict(permute_rope_layout(a.state_dict(), half, "interleaved"))
    assert_close(b(idx)[0], a(idx)[0], atol=1e-5, rtol=1e-5)
    b.load_state_dict(a.state_dict())  # same weights, wrong pairing: a different model
    assert not torch.allclose(b(idx)[0], a(idx)[0], atol=1e-3)
    back = permute_rope_layout(permute_rope_layout(a.state_dict(), half, "interleaved"), half, "half")
    for name, w in a.state_dict().items():
        assert torch.equal(back[name], w)
