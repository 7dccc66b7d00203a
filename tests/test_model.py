"""Model-level properties, parametrized over the registry so a new scheme is tested automatically."""

import math

import pytest
import torch
from conftest import tiny_config
from torch.testing import assert_close

import model as model_module
from model import GPT, chunked_cross_entropy
from posenc.positions import SCHEMES

EXTRAPOLATING = [s for s, cls in SCHEMES.items() if GPT(tiny_config(pos_encoding=s)).transformer.pos.max_len is None]


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_causality(scheme, tiny):
    """Changing token t never changes the logits before t."""
    model = tiny(pos_encoding=scheme)
    idx = torch.randint(0, 128, (1, 32))
    changed = idx.clone()
    changed[0, 20] = (idx[0, 20] + 1) % 128
    a, b = model(idx)[0], model(changed)[0]
    assert_close(a[:, :20], b[:, :20], atol=0, rtol=0)
    assert not torch.allclose(a[:, 20:], b[:, 20:])


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_one_batch_overfits(scheme, tiny):
    model = tiny(pos_encoding=scheme).train()
    idx = torch.randint(0, 128, (4, 33))
    x, y = idx[:, :-1], idx[:, 1:]
    opt = model.configure_optimizers(0.0, 1e-2, (0.9, 0.95), "cpu")
    first = None
    for _ in range(60):
        _, loss = model(x, y)
        first = first or loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first


@pytest.mark.parametrize("scheme", EXTRAPOLATING)
def test_finite_at_8x_training_length(scheme, tiny):
    model = tiny(pos_encoding=scheme)
    idx = torch.randint(0, 128, (1, 8 * 32))
    logits, _ = model(idx)
    assert logits.shape == (1, 256, 128) and torch.isfinite(logits).all()


def test_learned_positions_hit_the_wall_with_a_clear_error(tiny):
    model = tiny(pos_encoding="learned")
    assert model.transformer.pos.max_len == 32
    model(torch.zeros(1, 32, dtype=torch.long))  # exactly the table: fine
    with pytest.raises(ValueError, match=r"trained with 32 positions.*cannot extrapolate.*sinusoidal, rope, alibi"):
        model(torch.zeros(1, 33, dtype=torch.long))
    cache = model.make_kv_cache(1, 64)
    model(torch.zeros(1, 32, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="33 tokens is past the learned position table"):
        model(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)


@pytest.mark.parametrize("kw, message", [
    (dict(pos_encoding="rotary"), "unknown pos_encoding 'rotary'; choose one of learned, sinusoidal"),
    (dict(n_embd=30), "n_embd=30 is not divisible by n_head=4"),
    (dict(pos_encoding="rope", rotary_fraction=0.1), "must be an even number"),
    (dict(pos_encoding="rope", rope_layout="neox"), "config key 'rope_layout': expected half or interleaved"),
    (dict(dropout=1.5), "config key 'dropout': expected a number in"),
    (dict(n_layer=0), "config key 'n_layer': expected a number >= 1"),
    (dict(activation="gelu_new"), "config key 'activation': expected gelu or gelu_tanh"),
    (dict(pos_encoding="alibi", rope_scaling={"rope_type": "linear", "factor": 2}), "ALiBi needs no scaling"),
    (dict(pos_encoding="learned", rope_scaling={"rope_type": "linear", "factor": 2}), "cannot be scaled"),
    (dict(pos_encoding="sinusoidal", rope_scaling={"rope_type": "yarn", "factor": 2,
                                                   "original_max_position_embeddings": 32}), "cannot use"),
    (dict(pos_encoding="rope", rope_scaling={"rope_type": "linear", "factr": 2}), "unknown rope_scaling key"),
])
def test_bad_configs_fail_at_construction_with_one_line(kw, message):
    with pytest.raises(ValueError, match=message) as err:
        tiny_config(**kw)
    assert "\n" not in str(err.value)


def test_gelu_tanh_is_gpt2s_formula_and_not_exact_gelu():
    """activation="gelu_tanh" computes GPT-2's gelu_new, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), to float64
    rounding; the default is exact GELU, which differs from it by up to about 5e-4 (near |x| = 2)."""
    x = torch.linspace(-8, 8, 10001, dtype=torch.float64)[:, None]  # (N, 1): one MLP input feature
    gpt2 = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    mlps = {a: GPT(tiny_config(activation=a)).transformer.h[0].mlp.gelu for a in ("gelu", "gelu_tanh")}
    assert_close(mlps["gelu_tanh"](x), gpt2, atol=1e-12, rtol=0)
    assert_close(mlps["gelu"](x), torch.nn.functional.gelu(x), atol=0, rtol=0)
    assert 1e-4 < (mlps["gelu"](x) - gpt2).abs().max() < 1e-3


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_alibi_flex_attention_agrees_with_explicit_bias():
    if model_module.flex_attention is None:
        pytest.skip("FlexAttention not available in this torch")
    idx = torch.randint(0, 128, (2, 64))
    explicit = GPT(tiny_config(pos_encoding="alibi", attn_backend="sdpa", block_size=64)).eval()
    flex = GPT(tiny_config(pos_encoding="alibi", attn_backend="flex", block_size=64)).eval()
    flex.load_state_dict(explicit.state_dict())
    with torch.no_grad():  # FlexAttention has no backward on CPU; the forward is what must agree
        assert_close(flex(idx)[0], explicit(idx)[0], atol=1e-5, rtol=1e-5)


def test_chunked_cross_entropy_equals_plain_and_its_gradient():
    x = torch.randn(2, 50, 16, requires_grad=True)
    w = torch.randn(40, 16, requires_grad=True)
    t = torch.randint(0, 40, (2, 50))
    t[0, :5] = -1  # ignored targets
    loss = chunked_cross_entropy(x, w, t, chunk=16)
    ref = torch.nn.functional.cross_entropy((x @ w.T).view(-1, 40), t.view(-1), ignore_index=-1)
    assert_close(loss, ref)
    gx, gw = torch.autograd.grad(loss, (x, w))
    rx, rw = torch.autograd.grad(ref, (x, w))
    assert_close(gx, rx)
    assert_close(gw, rw)
    per_token = chunked_cross_entropy(x.detach(), w.detach(), t, reduction="none", chunk=16)
    assert per_token.shape == (2, 50) and (per_token[0, :5] == 0).all()


def test_flop_count_is_the_measured_matmuls_with_causal_attention_halved(tiny):
    """flops_per_token against torch's FLOP counter on a real forward+backward: the matmuls of the weights
    (6N per token) exactly, and half of what the non-causal attention matmuls of the math kernel cost."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    model, T = tiny(pos_encoding="learned", block_size=64).train(), 64
    x, y = torch.randint(0, 128, (2, 2, T)).unbind(0)  # batch 2
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, y)[1].backward()
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    weights, attention = by_op["aten.mm"] / (2 * T), by_op["aten.bmm"] / (2 * T)  # per token
    c = model.config
    assert model.flops_per_token(T) == weights + attention / 2
    assert attention / 2 == 6 * c.n_layer * c.n_embd * T
    assert model.estimate_mfu(1000.0, T, 1e12) == pytest.approx(1000 * model.flops_per_token(T) / 1e12)
