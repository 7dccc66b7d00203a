"""The schemes the length-generalization papers compare against: Kerple (Chi et al. 2022), FIRE (Li et al. 2023),
xPos (Sun et al. 2022). Kerple and FIRE are in no maintained package, so each bias is checked against its paper's
formula written out here, on hand-computed cases; xPos against x-transformers' rotary-with-xpos functions (a
test-only reference). The registry tests (test_model, test_kv_cache, test_train, test_explain, ...) run them too;
the blocked attention against the whole bias, with gradients, is in test_long_context."""

import math
from unittest.mock import patch

import pytest
import torch
from conftest import randomized, tiny_config
from test_kv_cache import TIGHT, cached_logits
from torch.testing import assert_close

import extend_context
import model as model_module
from model import GPT
from posenc import attention
from posenc.positions import FIRE, Kerple, RoPE, XPos, inverse_softplus, set_self_extend
from scripts import export_gguf, export_hf

BLOCK = 32  # tiny_config's training length


# ----------------------------------------------------------------------------- kerple

def kerple(kernel, r1, r2):
    """A 4-head Kerple scheme whose coefficients are r1 and r2 (lists of 4)."""
    scheme = Kerple(tiny_config(pos_encoding="kerple", pos_options={"kernel": kernel}))
    with torch.no_grad():
        scheme.raw_r1.copy_(inverse_softplus(torch.tensor(r1)))
        r2 = torch.tensor(r2)
        scheme.raw_r2.copy_(inverse_softplus(r2) if kernel == "log" else torch.logit(r2 / 2))
    return scheme


# The paper's kernels, with (head, query, key) -> the bias worked out by hand (math.log, no code of ours).
# log: -r1 * ln(1 + r2 * |m - n|); power: -r1 * |m - n|^r2.
R1, R2_LOG, R2_POWER = [1.0, 2.0, 0.5, 0.25], [1.0, 0.5, 3.0, 0.01], [0.5, 1.0, 2.0, 1.5]
HAND = {
    "log": {(0, 7, 4): -math.log(4), (1, 10, 0): -2 * math.log(6), (2, 5, 5): 0.0, (2, 9, 8): -0.5 * math.log(4),
            (3, 1000, 0): -0.25 * math.log(11)},
    "power": {(0, 16, 0): -4.0, (1, 30, 23): -2 * 7.0, (2, 3, 0): -0.5 * 9, (3, 4, 0): -0.25 * 8, (0, 6, 6): 0.0},
}


@pytest.mark.parametrize("kernel", ["log", "power"])
def test_kerple_bias_equals_the_papers_kernel_on_hand_computed_cases(kernel):
    scheme = kerple(kernel, R1, R2_LOG if kernel == "log" else R2_POWER)
    pos = torch.arange(1001)
    for (h, i, j), want in HAND[kernel].items():
        got = scheme.attn_bias(pos[i:i + 1], pos[j:j + 1], 0)[h, 0, 0].item()
        assert got == pytest.approx(want, rel=1e-6, abs=1e-6), (h, i, j)


def test_kerple_bias_depends_only_on_distance_and_is_one_for_all_layers():
    scheme = randomized(GPT(tiny_config(pos_encoding="kerple"))).transformer.pos
    pos = torch.arange(200)
    bias = scheme.attn_bias(pos, pos, 0)
    assert_close(scheme.attn_bias(pos + 5000, pos + 5000, 1), bias, atol=1e-6, rtol=1e-6)
    r1, r2 = scheme.coefficients()
    assert (r1 > 0).all() and (r2 > 0).all()
    # the bias falls with distance on every head, and the only position parameters are the two per-head vectors
    assert (bias[:, 199, 1:] > bias[:, 199, :-1]).all()
    assert sorted(n for n, _ in scheme.named_parameters()) == ["raw_r1", "raw_r2"]


@pytest.mark.parametrize("scheme", ["kerple", "fire"])
def test_the_bias_learns_through_blocks_that_keep_memory_linear(scheme):
    """With gradients the bias goes through checkpointed_blocks: each block builds its own slice of the bias
    (never more rows than the block), and every parameter of the scheme gets a gradient."""
    model = randomized(GPT(tiny_config(pos_encoding=scheme, block_size=64)))
    idx, targets = torch.randint(0, 128, (2, 2, 64)).unbind(0)
    shapes, real = [], attention.causal_mask

    def spy(bias_fn, q_pos, k_pos, device):
        mask = real(bias_fn, q_pos, k_pos, device)
        shapes.append(tuple(mask.shape))
        return mask

    n = 2 * 4 * 5 * 64  # blocks of 5 queries at B = 2, 4 heads, 64 keys
    with patch.multiple(attention, BLOCK_ELEMENTS=n, VIEW_ROWS=5), patch.object(attention, "causal_mask", spy):
        model(idx, targets)[1].backward()
    assert shapes and max(s[1] for s in shapes) == 5 and all(s[0] == 4 for s in shapes)
    for name, p in model.transformer.pos.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("kernel", ["log", "power"])
def test_kerple_score_mod_agrees_with_the_materialized_bias(kernel):
    """FlexAttention's score_mod (the GPU path, eager on the CPU: forward only) against the blocks' bias."""
    if model_module.flex_attention is None:
        pytest.skip("this torch has no FlexAttention")
    options = {"kernel": kernel}
    explicit = randomized(GPT(tiny_config(pos_encoding="kerple", pos_options=options, block_size=64,
                                          attn_backend="sdpa")))
    flex = GPT(tiny_config(pos_encoding="kerple", pos_options=options, block_size=64, attn_backend="flex"))
    flex.load_state_dict(explicit.state_dict())
    idx = torch.randint(0, 128, (2, 64))
    with torch.no_grad():
        losses = [m(idx[:, :-1], idx[:, 1:])[1] for m in (explicit, flex)]
    assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)


def test_kerple_power_kernel_cached_decoding_equals_the_full_forward():
    model = randomized(GPT(tiny_config(pos_encoding="kerple", pos_options={"kernel": "power"})).eval())
    idx = torch.randint(0, 128, (2, BLOCK + 16))
    with torch.no_grad():
        full = model(idx)[0]
    assert_close(cached_logits(model, idx, prefill=5), full, **TIGHT)


# ----------------------------------------------------------------------------- fire

def fire(shared=False):
    """A 4-head, 2-layer FIRE scheme with a 2-unit MLP of known weights: c = 1, L = 8 on every layer, and layer 1's
    output weights doubled (so layers differ unless shared)."""
    scheme = FIRE(tiny_config(pos_encoding="fire", pos_options={"hidden": 2, "shared": shared, "threshold": 8}))
    with torch.no_grad():
        for m, (first, _, last) in enumerate(scheme.mlps):
            first.weight.copy_(torch.tensor([[1.0], [-1.0]]))
            first.bias.copy_(torch.tensor([0.0, 0.5]))
            last.weight.copy_(torch.tensor([[2.0, 1.0], [-1.0, 3.0], [0.5, -2.0], [0.0, 1.0]]) * (1 + m))
            last.bias.copy_(torch.tensor([0.1, 0.0, -0.2, 0.3]))
        scheme.raw_c.copy_(inverse_softplus(torch.ones_like(scheme.raw_c)))
    return scheme


def fire_by_the_paper(i, j, head, layer, c=1.0, L=8.0):
    """The paper's bias with fire()'s weights: f(psi(i - j) / psi(max(L, i))), psi(x) = ln(c x + 1)."""
    x = math.log(c * (i - j) + 1) / math.log(c * max(L, i) + 1)
    hidden = [max(0.0, x), max(0.0, -x + 0.5)]
    w = [[2.0, 1.0], [-1.0, 3.0], [0.5, -2.0], [0.0, 1.0]][head]
    return (1 + layer) * (w[0] * hidden[0] + w[1] * hidden[1]) + [0.1, 0.0, -0.2, 0.3][head]


def test_fire_bias_equals_the_papers_formula_on_hand_computed_cases():
    scheme = fire()
    pos = torch.arange(100)

    def ours(i, j, head, layer):
        return scheme.attn_bias(pos[i:i + 1], pos[j:j + 1], layer)[head, 0, 0].item()

    # by hand: i = 3, j = 0: x = ln 4 / ln 9 = 0.630930, hidden (0.630930, 0); head 0: 2x + 0.1
    assert ours(3, 0, 0, 0) == pytest.approx(1.361860, abs=1e-5)
    # i = 20 > L: x = ln 11 / ln 21 = 0.787610; head 1: -x + 3 * 0 = -0.787610; layer 1 doubles the weights
    assert ours(20, 10, 1, 0) == pytest.approx(-0.787610, abs=1e-5)
    assert ours(20, 10, 1, 1) == pytest.approx(-1.575220, abs=1e-5)
    for i, j in [(0, 0), (5, 2), (7, 7), (8, 1), (20, 17), (99, 0), (99, 98), (40, 30)]:
        for head in range(4):
            for layer in range(2):
                assert ours(i, j, head, layer) == pytest.approx(fire_by_the_paper(i, j, head, layer), abs=1e-5)
    # below L the bias is one of the distance (i = 5 and 3 at distance 3), past it the distance is interpolated
    assert ours(5, 2, 0, 0) == pytest.approx(ours(3, 0, 0, 0), abs=1e-6)
    assert ours(20, 17, 0, 0) < ours(5, 2, 0, 0) - 0.2


def test_fire_shared_is_one_mlp_for_every_layer():
    shared, own = fire(shared=True), fire()
    pos = torch.arange(40)
    assert len(shared.mlps) == 1 and len(own.mlps) == 2
    assert_close(shared.attn_bias(pos, pos, 1), shared.attn_bias(pos, pos, 0), atol=0, rtol=0)
    assert not torch.allclose(own.attn_bias(pos, pos, 1), own.attn_bias(pos, pos, 0))


def test_fire_bias_stays_fp32_under_autocast_and_in_a_bf16_model():
    scheme = fire().to(torch.bfloat16)
    pos = torch.arange(40)
    with torch.autocast("cpu", torch.bfloat16):
        bias = scheme.attn_bias(pos, pos, 0)
    assert bias.dtype == torch.float32
    assert bias[0, 3, 0].item() == pytest.approx(1.361860, abs=1e-2)  # the weights were rounded to bf16


def test_fire_options_are_checked_in_one_line():
    for options, words in [({"hidden": 0}, "'hidden' of fire: expected an integer >= 1"),
                           ({"shared": 1}, "'shared' of fire: expected true or false"),
                           ({"threshold": -3}, "'threshold' of fire: expected a number > 0")]:
        with pytest.raises(ValueError, match=words):
            tiny_config(pos_encoding="fire", pos_options=options)


# ----------------------------------------------------------------------------- xpos

def xpos(T, scale_base=512, **overrides):
    """An xPos scheme with tables for T positions: interleaved pairs and half the head rotated, as x-transformers'."""
    config = tiny_config(pos_encoding="xpos", rope_layout="interleaved", rotary_fraction=0.5,
                         pos_options={"scale_base": scale_base}, **overrides)
    scheme = XPos(config)
    scheme.prepare(T, torch.device("cpu"))
    return scheme


def scheme_config(scheme):
    """The config of a plain RoPE with the scheme's rotation (its layout and rotated fraction)."""
    return tiny_config(pos_encoding="rope", rope_layout=scheme.layout, rotary_fraction=0.5)


# Ours against x-transformers' RotaryEmbedding(use_xpos=True) and apply_rotary_pos_emb (query scale, key scale^-1),
# run in float64: the causal scores q·k of random q, k (entries N(0, 1), 8 dims a head, 4 rotated; scores up to ~20)
# agree to 2.2e-6 (gamma 512) and 1.7e-6 (gamma 32) over 300 positions; the tolerance, 1e-5, is fp32 rounding of
# our rotation and scales (2^-24 relative on each of q and k) with room. x-transformers counts the scale from the
# middle of the sequence, we from 0: q·k is the same, which is the point of comparing scores.
@pytest.mark.parametrize("scale_base", [512, 32])
def test_xpos_scores_equal_x_transformers(scale_base):
    xt = pytest.importorskip("x_transformers.x_transformers")
    T = 300
    scheme = xpos(T, scale_base)
    q, k, pos = torch.randn(2, 4, T, 8), torch.randn(2, 4, T, 8), torch.arange(T)
    rq, rk = scheme.rotate(q, k, pos, 0)
    ours = rq @ rk.transpose(-2, -1)  # (B, nh, T, T)
    rotary = xt.RotaryEmbedding(scheme.rot_dim, use_xpos=True, scale_base=scale_base).double()
    freqs, scale = rotary(pos)
    theirs = xt.apply_rotary_pos_emb(q.double(), freqs, scale) @ xt.apply_rotary_pos_emb(k.double(), freqs, scale ** -1
                                                                                         ).transpose(-2, -1)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    assert_close(ours.double()[..., causal], theirs[..., causal], atol=1e-5, rtol=0)
    plain = RoPE(scheme_config(scheme))
    plain.prepare(T, torch.device("cpu"))
    pq, pk = plain.rotate(q, k, pos, 0)
    rope_scores = pq @ pk.transpose(-2, -1)
    assert not torch.allclose(rope_scores.double()[..., causal], theirs[..., causal], atol=1e-2)  # the decay shows


def test_xpos_score_depends_only_on_distance_and_is_ropes_times_the_papers_decay():
    """Shifted by 20000 positions, the scores of random q, k are the same (fp32 scales: 1e-4); and with q and k
    nonzero in one rotated pair i only, the score is plain RoPE's times zeta_i^((m - n) / gamma), zeta_i =
    (2i + 0.4 d) / (1.4 d) (the paper's, written out here; d = 4 rotated dims, gamma = 512)."""
    scheme = xpos(20300)
    plain = RoPE(scheme_config(scheme))
    plain.prepare(300, torch.device("cpu"))
    q, k, pos = torch.randn(1, 4, 300, 8), torch.randn(1, 4, 300, 8), torch.arange(300)

    def scores(s, q, k, p):
        rq, rk = s.rotate(q, k, p, 0)
        return (rq @ rk.transpose(-2, -1)).tril()

    assert_close(scores(scheme, q, k, pos + 20000), scores(scheme, q, k, pos), atol=1e-4, rtol=1e-4)
    d = 4
    for i in range(d // 2):  # interleaved: pair i is dims 2i, 2i + 1
        one_pair = torch.zeros(8)
        one_pair[2 * i:2 * i + 2] = 1.0
        qi, ki = q * one_pair, k * one_pair
        zeta = (2 * i + 0.4 * d) / (1.4 * d)
        distance = (pos[:, None] - pos[None, :]).clamp(min=0).double()
        by_the_paper = scores(plain, qi, ki, pos).double() * zeta ** (distance / 512)
        assert_close(scores(scheme, qi, ki, pos).double(), by_the_paper, atol=1e-5, rtol=1e-5)


def test_xpos_refuses_past_fp32s_range_in_one_line():
    scheme = XPos(tiny_config(pos_encoding="xpos"))
    assert 33_000 < scheme.max_len < 35_000  # 512 * 120 ln 2 / ln(1.4 / 0.4)
    with pytest.raises(ValueError, match=r"longer than xPos runs \(\d+\): its key scale .* larger scale_base") as err:
        scheme.check_length(scheme.max_len + 1)
    assert "\n" not in str(err.value)
    scheme.prepare(scheme.max_len, torch.device("cpu"))
    far = torch.tensor([0, scheme.max_len - 1])
    rq, rk = scheme.rotate(torch.ones(1, 1, 2, 32), torch.ones(1, 1, 2, 32), far, 0)
    assert torch.isfinite(rq).all() and torch.isfinite(rk).all() and (rq[..., 1, :].abs() > 0).any()


def test_xpos_refuses_self_extend_in_one_line(tiny):
    with pytest.raises(ValueError, match="Self-Extend cannot run on this xpos model: .*not xPos's decay"):
        set_self_extend(tiny(pos_encoding="xpos"), 8, 2)


# ----------------------------------------------------------------------------- refusals, in one line each

def scaling(rope_type):
    return {"rope_type": rope_type, "factor": 4.0, "original_max_position_embeddings": BLOCK}


@pytest.mark.parametrize("scheme, words", [("kerple", "Kerple needs no scaling"), ("fire", "FIRE needs no scaling"),
                                           ("xpos", "no RoPE scaling is defined for xPos"),
                                           ("cope", "CoPE needs no scaling"),
                                           ("fox", "the forget gate needs no scaling")])
def test_scaling_export_and_bad_options_are_refused_in_one_line(scheme, words):
    with pytest.raises(ValueError, match=f"cannot use rope_scaling 'linear': {words}"):
        tiny_config(pos_encoding=scheme, rope_scaling=scaling("linear"))
    scaled, target = extend_context.rope_scaling_for(tiny_config(pos_encoding="rope"), "yarn", factor=4)
    with pytest.raises(ValueError, match=f"cannot extend ckpt.pt: .*{words}"):
        extend_context.check_extendable(tiny_config(pos_encoding=scheme), scaled, target, "ckpt.pt")
    config = tiny_config(pos_encoding=scheme, vocab_size=50304)
    for check in (export_hf.check_exportable, export_gguf.gguf_architecture):
        with pytest.raises(ValueError, match=f"cannot export a {scheme} model") as err:
            check(config)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=f"unknown pos_options key.*for pos_encoding '{scheme}'"):
        tiny_config(pos_encoding=scheme, pos_options={"no_such_option": 1})


def test_kerple_refuses_an_unknown_kernel():
    with pytest.raises(ValueError, match="bad pos_options value 'cubic' for 'kernel' of kerple: choose log or power"):
        tiny_config(pos_encoding="kerple", pos_options={"kernel": "cubic"})
