"""The schemes whose logits depend on the data, not on positions alone: CoPE (Golovneva et al. 2024) and the
Forgetting Transformer's forget gate (Lin et al. 2025). Each is checked against x-transformers (a test-only
reference: its CoPE and its DataDependentAlibi, the forget gate of the same paper, through its Attend), against the
scheme it reduces to, and for memory linear in T with gradients. The registry tests (test_kv_cache, test_model,
test_train, test_explain, ...) run them too; test_explain holds each paper's formula written out by hand."""

import math
from unittest.mock import patch

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from torch.testing import assert_close

from model import GPT
from posenc import attention
from posenc.generation import generate, why_not_static
from posenc.positions import CoPE, ForgetGate

B, NH, HS, T = 2, 4, 8, 60


def causal_attention(q, k, v, bias=None):
    """softmax(q·k / √hs + bias, causal) v, written out in float64."""
    scores = q.double() @ k.double().transpose(-2, -1) / math.sqrt(q.size(-1))
    if bias is not None:
        scores = scores + bias.double()
    future = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool).triu(1)
    return scores.masked_fill(future, -math.inf).softmax(-1) @ v.double()


def qkv():
    torch.manual_seed(0)
    return (torch.randn(B, NH, T, HS) for _ in range(3))


# ----------------------------------------------------------------------------- CoPE

def cope(npos_max=16):
    """A CoPE scheme of one layer, its table drawn N(0, 1) (at init it is zero: NoPE)."""
    scheme = CoPE(tiny_config(pos_encoding="cope", n_layer=1, n_head=NH, n_embd=NH * HS,
                              pos_options={"npos_max": npos_max}))
    with torch.no_grad():
        scheme.tables[0].normal_()
    return scheme


# Ours against x-transformers' CoPE (the paper's appendix code) inside its Attend, causal, fp32, on random q, k, v
# (N(0, 1), 8 dims a head) at 60 tokens: the counted positions pass npos_max = 16, so the clamp is exercised.
# Measured max difference 2.5e-6; the tolerance, 1e-5, is fp32 rounding of two differently ordered sums of 60 gates
# and of the softmax, with room.
def test_cope_attention_equals_x_transformers():
    xt = pytest.importorskip("x_transformers.x_transformers")
    from x_transformers.attend import Attend
    scheme, (q, k, v) = cope(), qkv()
    pos = torch.arange(T)
    with torch.no_grad():
        ours = scheme.attend(q, k, v, pos, pos, 0)
        reference = xt.CoPE(dim=HS, heads=NH, max_pos=scheme.npos_max)
        reference.pos_emb.copy_(scheme.tables[0])
        theirs, _ = Attend(causal=True, cope=reference)(q, k, v)
        counted = (q @ k.transpose(-2, -1) / math.sqrt(HS)).sigmoid().tril().sum(-1)  # p of key 0, per query
    assert counted.max() > scheme.npos_max  # the clamp is reached
    assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert not torch.allclose(ours.double(), causal_attention(q, k, v), atol=1e-2)  # the positions show


def test_cope_with_a_zero_table_is_nope():
    scheme, (q, k, v) = cope(), qkv()
    with torch.no_grad():
        scheme.tables[0].zero_()
        assert_close(scheme.attend(q, k, v, torch.arange(T), torch.arange(T), 0).double(), causal_attention(q, k, v),
                     atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- the forget gate

def fox(layers=1):
    """A forget-gate scheme with random gates: weights N(0, 0.3), biases N(2, 1) (f from about 0.5 to 0.99)."""
    scheme = ForgetGate(tiny_config(pos_encoding="fox", n_layer=layers, n_head=NH, n_embd=NH * HS))
    with torch.no_grad():
        for g in scheme.gate:
            g.weight.normal_(0, 0.3)
            g.bias.normal_(2, 1)
    return scheme


# Ours against x-transformers' DataDependentAlibi (its forget gates: a Linear, log-sigmoid, cumulative sums) as the
# attn_bias of its Attend, causal, fp32, with our gate's weights; random x, q, k, v (N(0, 1)) at 60 tokens.
# Measured max difference 3.6e-7; the tolerance, 1e-5, is fp32 rounding of 60-term cumulative sums and the softmax.
def test_forget_gate_attention_equals_x_transformers():
    xt = pytest.importorskip("x_transformers.x_transformers")
    from x_transformers.attend import Attend
    scheme, (q, k, v) = fox(), qkv()
    x = torch.randn(B, T, NH * HS)
    pos = torch.arange(T)
    with torch.no_grad():
        ours = scheme.attend(q, k, v, pos, pos, 0, gates=scheme.gates(x, 0))
        reference = xt.DataDependentAlibi(dim=NH * HS, heads=NH)
        linear = reference.to_forget_gates[0]
        linear.weight.copy_(scheme.gate[0].weight)
        linear.bias.copy_(scheme.gate[0].bias)
        theirs, _ = Attend(causal=True)(q, k, v, attn_bias=reference(x))
    assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert not torch.allclose(ours.double(), causal_attention(q, k, v), atol=1e-2)  # the gates show


def test_a_constant_forget_gate_is_alibi_with_slope_minus_log_f():
    """With no weight and bias b_h, every f is sigmoid(b_h): the bias (i - j) log f_h is ALiBi's with that slope."""
    scheme, (q, k, v) = fox(), qkv()
    b = torch.tensor([-1.0, 0.0, 2.0, 6.0])
    with torch.no_grad():
        scheme.gate[0].weight.zero_()
        scheme.gate[0].bias.copy_(b)
        out = scheme.attend(q, k, v, torch.arange(T), torch.arange(T), 0, gates=scheme.gates(torch.randn(B, T, NH * HS), 0))
    distance = (torch.arange(T)[:, None] - torch.arange(T)[None, :]).clamp(min=0).double()
    slopes = -F.logsigmoid(b.double())
    assert_close(out.double(), causal_attention(q, k, v, -slopes[:, None, None] * distance), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- both: memory, gradients, decoding

@pytest.mark.parametrize("scheme", ["cope", "fox"])
def test_blocks_keep_memory_linear_and_give_the_gradients_of_one_block(scheme):
    """With gradients, blocks of 5 queries (each checkpointed: its scores exist only while it runs, never (T, T))
    give the loss and every parameter's gradient of one block of all 64 queries."""
    torch.manual_seed(0)
    model = GPT(tiny_config(pos_encoding=scheme, block_size=64))
    with torch.no_grad():
        for p in model.transformer.pos.parameters():
            p.normal_(0, 0.5)
    idx, targets = torch.randint(0, 128, (2, 2, 64)).unbind(0)

    def loss_and_grads():
        model.zero_grad()
        loss = model(idx, targets)[1]
        loss.backward()
        return loss, {n: p.grad.clone() for n, p in model.named_parameters()}

    shapes, real = [], attention._explicit_block

    def spy(q, k, v, **kw):
        shapes.append(tuple(q.shape[-2:-1]) + (k.size(-2),))
        return real(q, k, v, **kw)

    whole = loss_and_grads()
    with patch.object(attention, "BLOCK_ELEMENTS", 2 * 4 * 5 * 64), patch.object(attention, "_explicit_block", spy):
        blocked = loss_and_grads()
    assert shapes and max(rows for rows, _ in shapes) == 5  # no block held more than 5 queries' scores
    assert_close(blocked[0], whole[0], atol=1e-6, rtol=1e-6)
    for name, g in whole[1].items():
        assert_close(blocked[1][name], g, atol=1e-6, rtol=1e-5)
    for name, p in model.transformer.pos.named_parameters():
        assert whole[1]["transformer.pos." + name].abs().sum() > 0, name


@pytest.mark.parametrize("scheme", ["cope", "fox"])
def test_decoding_takes_the_cached_forward_and_says_why_not_the_static_step(scheme):
    model = GPT(tiny_config(pos_encoding=scheme)).eval()
    assert f"{scheme} forms its attention itself" in why_not_static(model)
    prompt = torch.randint(0, 128, (1, 10))
    out = generate(model, prompt, 12, temperature=0)
    with torch.no_grad():  # greedy, token by token, with no cache: the same tokens
        idx = prompt
        for _ in range(12):
            idx = torch.cat([idx, model(idx)[0][:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, idx)


def test_forget_gate_starts_at_bias_init_after_the_models_own_init():
    """The model's init zeroes every Linear's bias; bias_init is applied after it: f = sigmoid(bias_init)."""
    assert all((g.bias == 0).all() for g in GPT(tiny_config(pos_encoding="fox")).transformer.pos.gate)
    gates = GPT(tiny_config(pos_encoding="fox", pos_options={"bias_init": 5})).transformer.pos.gate
    assert all((g.bias == 5).all() and g.weight.std() < 0.05 for g in gates)
    with pytest.raises(ValueError, match="bad pos_options value 'big' for 'bias_init' of fox: expected a number"):
        tiny_config(pos_encoding="fox", pos_options={"bias_init": "big"})


def test_cope_refuses_a_bad_npos_max_in_one_line():
    for bad in (1, 2.5, True, "64"):
        with pytest.raises(ValueError, match=f"bad pos_options value {bad!r} for 'npos_max' of cope"):
            tiny_config(pos_encoding="cope", pos_options={"npos_max": bad})
