"""Two schemes that recent models use beside the classic five: rope_nope (RoPE with NoPE layers and Llama 4's
query temperature) and t5 (T5's bucketed relative bias). The registry tests (test_model, test_kv_cache, test_train,
...) run them too; these test what is their own. Their settings are GPTConfig.pos_options, checked by the scheme."""

import math

import pytest
import torch
from conftest import randomized, tiny_config
from test_kv_cache import TIGHT, cached_logits, prefix_logits
from torch.testing import assert_close

import extend_context
import model as model_module
from model import GPT
from posenc.positions import NoPE, RoPE, RoPENoPE, t5_buckets
from posenc.rope_scaling import ROPE_SCALING, length_dependent
from scripts import export_hf
from train import load_config

BLOCK = 32  # tiny_config's training length


def scaling(rope_type):
    return {"rope_type": rope_type, "factor": 4.0, "original_max_position_embeddings": BLOCK}


# ----------------------------------------------------------------------------- t5

# Default settings (32 buckets, max_distance 128, causal): distances 0..15 are their own bucket; bucket b >= 16 starts
# at the first distance d >= 16 * 8^((b - 16) / 16) (T5: b = 16 + floor(16 * ln(d / 16) / ln 8)), so 17 starts at
# 19 (18.22), 18 at 21 (20.75), 21 at 31 (30.45), 26 at 59 (58.69), 27 at 67 (66.89), 30 at 99 (98.70), 31 at 113
# (112.38); 31 is also the overflow bucket of every distance from 128 on.
HAND_TABLE = {0: 0, 1: 1, 7: 7, 15: 15,  # exact
              16: 16, 18: 16, 19: 17, 20: 17, 21: 18, 30: 20, 31: 21, 32: 21, 58: 25, 59: 26, 64: 26, 66: 26,
              67: 27, 98: 29, 99: 30, 112: 30, 113: 31, 127: 31,  # logarithmic
              128: 31, 129: 31, 1000: 31, 100_000: 31}  # overflow


def test_t5_buckets_match_a_hand_written_table():
    distances = torch.tensor(list(HAND_TABLE))
    assert t5_buckets(distances).tolist() == list(HAND_TABLE.values())
    assert t5_buckets(torch.tensor([-1, -50])).tolist() == [0, 0]  # a future key: bucket 0, as in T5 (masked anyway)
    every = t5_buckets(torch.arange(200))
    assert (every[1:] >= every[:-1]).all() and set(every.tolist()) == set(range(32))  # monotone, no bucket unused


def test_t5_bias_depends_only_on_distance_and_is_one_table_for_all_layers():
    scheme = randomized(GPT(tiny_config(pos_encoding="t5"))).transformer.pos
    assert scheme.table.shape == (4, 32)  # (heads, buckets): the only position parameters
    pos = torch.arange(300)
    bias = scheme.attn_bias(pos, pos, 0)  # (nh, T, T)
    assert_close(scheme.attn_bias(pos + 1000, pos + 1000, 1), bias, atol=0, rtol=0)  # shifted, another layer
    for (i, j), bucket in {(5, 5): 0, (40, 21): 17, (200, 136): 26, (299, 186): 31, (299, 0): 31}.items():
        assert_close(bias[:, i, j], scheme.table[:, bucket], atol=0, rtol=0)  # distances of HAND_TABLE
        assert_close(bias[:, i, j], bias[:, i - j, 0], atol=0, rtol=0)


def test_t5_is_causal_with_a_trained_looking_table():
    model = randomized(GPT(tiny_config(pos_encoding="t5")).eval())
    idx = torch.randint(0, 128, (1, 48))
    changed = idx.clone()
    changed[0, 30] = (idx[0, 30] + 1) % 128
    with torch.no_grad():
        a, b = model(idx)[0], model(changed)[0]
    assert_close(a[:, :30], b[:, :30], atol=0, rtol=0)
    assert not torch.allclose(a[:, 30:], b[:, 30:])


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="FlexAttention's backward needs a GPU"))])
def test_t5_score_mod_agrees_with_the_materialized_bias(device):
    """The GPU path (FlexAttention's score_mod, no T x T tensor) against the CPU path (the bias materialized).
    On the CPU, FlexAttention runs eagerly and has no backward: the forward only; on a GPU, compiled, the table's
    gradient too."""
    if model_module.flex_attention is None:
        pytest.skip("this torch has no FlexAttention")
    options = {"num_buckets": 8, "max_distance": 20}  # the overflow bucket within 64 tokens
    explicit = randomized(GPT(tiny_config(pos_encoding="t5", pos_options=options, block_size=64, attn_backend="sdpa")))
    flex = GPT(tiny_config(pos_encoding="t5", pos_options=options, block_size=64, attn_backend="flex"))
    flex.load_state_dict(explicit.state_dict())
    explicit, flex = explicit.to(device), flex.to(device)
    idx = torch.randint(0, 128, (2, 64), device=device)
    with torch.set_grad_enabled(device == "cuda"):
        losses = [m(idx[:, :-1], idx[:, 1:])[1] for m in (explicit, flex)]
    assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    if device == "cuda":
        for loss in losses:
            loss.backward()
        grads = [m.transformer.pos.table.grad for m in (explicit, flex)]
        assert grads[0].abs().max() > 0
        assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)  # the table learns through both paths alike


def test_t5_cached_decoding_equals_the_full_forward_past_max_distance():
    model = randomized(GPT(tiny_config(pos_encoding="t5", pos_options={"num_buckets": 8, "max_distance": 20})).eval())
    idx = torch.randint(0, 128, (2, BLOCK + 16))
    with torch.no_grad():
        full = model(idx)[0]
    assert_close(cached_logits(model, idx, prefill=5), full, **TIGHT)


def test_t5_options_and_scaling_are_checked_in_one_line():
    with pytest.raises(ValueError, match="cannot use rope_scaling 'linear': T5's bias needs no scaling"):
        tiny_config(pos_encoding="t5", rope_scaling=scaling("linear"))
    with pytest.raises(ValueError, match="'max_distance' of t5: expected an integer >= 17"):
        tiny_config(pos_encoding="t5", pos_options={"max_distance": 16})
    assert GPT(tiny_config(pos_encoding="t5", pos_options={"num_buckets": 8})).transformer.pos.table.shape == (4, 8)


# ----------------------------------------------------------------------------- rope_nope

def hybrid(**options):
    return tiny_config(pos_encoding="rope_nope", n_layer=4, pos_options=options or None)


def test_nope_layers_are_every_kth_or_the_listed_ones():
    assert RoPENoPE.nope_layers(hybrid()) == {3}  # SmolLM3's and Llama 4's rule: (layer + 1) % 4 == 0
    assert RoPENoPE.nope_layers(hybrid(nope_interval=2)) == {1, 3}
    assert RoPENoPE.nope_layers(hybrid(nope_interval=1)) == {0, 1, 2, 3}
    assert RoPENoPE.nope_layers(hybrid(nope_layers=[0, 2])) == {0, 2}
    for options, words in [({"nope_layers": [4]}, "layer indices in 0..3"), ({"nope_interval": 0}, "integer >= 1"),
                           ({"nope_layers": [1], "nope_interval": 2}, "not both"), ({"temperature": 1}, "it takes")]:
        with pytest.raises(ValueError, match=words):
            hybrid(**options)
    with pytest.raises(ValueError, match="unknown pos_options key.*'rope': it has no options"):
        tiny_config(pos_encoding="rope", pos_options={"nope_interval": 2})


@pytest.mark.parametrize("rope_type", [None, *ROPE_SCALING])
def test_rope_layers_are_plain_rope_and_nope_layers_see_no_rotation(rope_type):
    config = tiny_config(pos_encoding="rope_nope", n_layer=4, pos_options={"nope_interval": 2},
                         rope_scaling=scaling(rope_type) if rope_type else None)
    scheme, plain = RoPENoPE(config), RoPE(config)
    T = 3 * BLOCK
    scheme.prepare(T, torch.device("cpu"))
    plain.prepare(T, torch.device("cpu"))
    q, k, pos = torch.randn(2, 4, T, 8), torch.randn(2, 4, T, 8), torch.arange(T)
    for layer in (0, 2):
        for ours, theirs in zip(scheme.rotate(q, k, pos, layer), plain.rotate(q, k, pos, layer)):
            assert_close(ours, theirs, atol=0, rtol=0)
    for layer in (1, 3):
        for ours, given in zip(scheme.rotate(q, k, pos, layer), (q, k)):
            assert ours is given
    assert not torch.allclose(plain.rotate(q, k, pos, 1)[0], q)  # so the test above could fail


def test_without_temperature_it_is_rope_and_nope_layers_stacked():
    """The model against blocks run by hand, each with a plain RoPE or a plain NoPE scheme."""
    model = randomized(GPT(hybrid(nope_interval=2)).eval())
    rope, nope = RoPE(model.config), NoPE(model.config)
    idx = torch.randint(0, 128, (2, 2 * BLOCK))
    pos = torch.arange(idx.size(1))
    rope.prepare(idx.size(1), idx.device)
    with torch.no_grad():
        x = model.transformer.wte(idx)
        for layer, block in enumerate(model.transformer.h):
            x = block(x, nope if layer % 2 else rope, pos, pos, None, layer)
        by_hand = model.lm_head(model.transformer.ln_f(x))
        assert_close(model(idx)[0], by_hand, atol=1e-5, rtol=1e-5)
        model.transformer.pos = rope  # the same weights with RoPE everywhere: another model, so NoPE layers count
        assert not torch.allclose(model(idx)[0], by_hand, atol=1e-3)


def test_temperature_is_one_below_floor_scale_then_llama4s_formula():
    scheme = RoPENoPE(hybrid(attn_scale=0.1, floor_scale=8))
    pos = torch.arange(40)
    t = scheme.temperature(pos)
    assert torch.equal(t[:7], torch.ones(7))  # p + 1 < floor_scale
    for p in (7, 15, 23, 39):  # 1 + 0.1 * ln(1 + floor((p + 1) / 8))
        assert t[p].item() == pytest.approx(1 + 0.1 * math.log(1 + (p + 1) // 8), rel=1e-6)
    q, k = torch.randn(1, 4, 40, 8), torch.randn(1, 4, 40, 8)
    tq, tk = scheme.rotate(q, k, pos, 3)
    assert_close(tq, q * t[:, None], atol=0, rtol=0)  # the queries only, on a NoPE layer
    assert tk is k
    assert torch.equal(RoPENoPE(hybrid(floor_scale=8)).rotate(q, k, pos, 3)[0], q)  # attn_scale 0: off
    assert RoPENoPE(hybrid(attn_scale=0.1)).floor_scale == BLOCK  # the default: the training length ...
    extended = tiny_config(pos_encoding="rope_nope", block_size=4 * BLOCK, rope_scaling=scaling("yarn"))
    assert RoPENoPE(extended).floor_scale == BLOCK  # ... which an extended model keeps


@pytest.mark.parametrize("rope_type", [None, *ROPE_SCALING])
def test_rope_nope_cached_decoding_equals_the_full_forward_with_every_scaling(rope_type):
    config = tiny_config(pos_encoding="rope_nope", n_layer=4, rope_scaling=scaling(rope_type) if rope_type else None,
                         pos_options={"nope_interval": 2, "attn_scale": 0.1, "floor_scale": 8})
    model = randomized(GPT(config).eval())
    idx = torch.randint(0, 128, (2, BLOCK + 16))
    reference = prefix_logits(model, idx)  # dynamic NTK: positions mean what they mean at each length
    if not length_dependent(config.rope_scaling):
        with torch.no_grad():
            assert_close(model(idx)[0], reference, **TIGHT)
    assert_close(cached_logits(model, idx, prefill=5), reference, **TIGHT)


# ----------------------------------------------------------------------------- both, through the rest of the code

def test_options_come_from_the_command_line_and_config_files():
    cfg = load_config(["--pos_encoding=rope_nope", '--pos_options={"nope_interval": 2, "attn_scale": 0.1}'])
    assert cfg.model.pos_options == {"nope_interval": 2, "attn_scale": 0.1}
    with pytest.raises(ValueError, match="bad pos_options value 'x' for 'attn_scale'"):
        load_config(["--pos_encoding=rope_nope", '--pos_options={"attn_scale": "x"}'])


@pytest.mark.parametrize("scheme, words", [("rope_nope", "SmolLM3 and Llama 4"), ("t5", "encoder-decoders")])
def test_export_refuses_in_one_line_saying_why(scheme, words):
    with pytest.raises(ValueError, match=f"cannot export a {scheme} model: .*{words}") as err:
        export_hf.check_exportable(tiny_config(pos_encoding=scheme, vocab_size=50304))
    assert "\n" not in str(err.value)


def test_rope_nope_extends_and_t5_refuses_in_one_line():
    scaled, target = extend_context.rope_scaling_for(hybrid(), "yarn", factor=4)
    assert extend_context.check_extendable(hybrid(), scaled, target, "ckpt.pt").rope_scaling["rope_type"] == "yarn"
    with pytest.raises(ValueError, match="cannot extend ckpt.pt: .*T5's bias needs no scaling"):
        extend_context.check_extendable(tiny_config(pos_encoding="t5"), scaled, target, "ckpt.pt")
