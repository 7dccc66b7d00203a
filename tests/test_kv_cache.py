"""The KV cache gives the same logits as the full forward, for every scheme and every RoPE scaling.

Dynamic NTK is the special case: its frequencies depend on the current length, so the reference for the
cached step t is the last position of a full forward over the prefix t + 1 (what use_cache=False does).
Past the training length every layer's cached keys and values go stale at each step; the model sees this
through the scheme's cache_key and recomputes them from the cached tokens, so the match is exact for any
depth (Hugging Face's cached dynamic NTK drifts here instead).
"""

from unittest.mock import patch

import pytest
import torch
from conftest import sharpened, tiny_config
from torch.testing import assert_close

from model import GPT
from posenc.generation import decode_step_of, generate, why_not_static
from posenc.positions import SCHEMES, set_self_extend
from posenc.rope_scaling import ROPE_SCALING, length_dependent

BLOCK = 32  # training length of the tiny models; sequences below go past it
TIGHT = dict(atol=2e-5, rtol=1e-5)  # fp32: only the order of floating point sums differs


def scaling(rope_type):
    return {"rope_type": rope_type, "factor": 4.0, "original_max_position_embeddings": BLOCK}


CASES = {name: dict(pos_encoding=name) for name in SCHEMES}
CASES.update({f"rope-{t}": dict(pos_encoding="rope", rope_scaling=scaling(t)) for t in ROPE_SCALING})
CASES.update({f"rope-{t}-interleaved": dict(pos_encoding="rope", rope_layout="interleaved", rope_scaling=scaling(t))
              for t in ("yarn", "dynamic")})
CASES["rope-interleaved-partial"] = dict(pos_encoding="rope", rope_layout="interleaved", rotary_fraction=0.5)
CASES["sinusoidal-linear"] = dict(pos_encoding="sinusoidal", rope_scaling=scaling("linear"))
# the whole-sequence forward is a valid reference where positions mean the same at every length
STATIC = [c for c, kw in CASES.items() if not length_dependent(kw.get("rope_scaling"))]


def tiny(case, **overrides):
    """The case's tiny model, sharpened: at init an off-by-one position would move the logits by about TIGHT."""
    return sharpened(GPT(tiny_config(**CASES[case], **overrides)).eval())


def seq_len(model):
    """Past the training length, except for a scheme that stops at its table (learned: exactly BLOCK rows)."""
    return min(BLOCK + 16, model.transformer.pos.max_len or BLOCK + 16)


@torch.no_grad()
def cached_logits(model, idx, prefill):
    """Prefill `prefill` tokens in one forward, then feed the rest one token at a time: (B, T, V)."""
    cache = model.make_kv_cache(idx.size(0), idx.size(1))
    out = [model(idx[:, :prefill], kv_cache=cache)[0]]
    out += [model(idx[:, t:t + 1], kv_cache=cache)[0] for t in range(prefill, idx.size(1))]
    assert cache.pos == idx.size(1)
    return torch.cat(out, dim=1)


@torch.no_grad()
def prefix_logits(model, idx):
    """Reference: logits at t from a full forward over idx[:, :t + 1] (no cache)."""
    return torch.stack([model(idx[:, :t + 1], last_only=True)[0][:, -1] for t in range(idx.size(1))], dim=1)


@torch.no_grad()
def static_logits(model, idx, prefill, step=None):
    """Prefill as cached_logits, then every token through the static step (model.decode_step): (B, T, V)."""
    B, T = idx.shape
    step = step or model.decode_step
    cache = model.make_kv_cache(B, T)
    out = [model(idx[:, :prefill], kv_cache=cache)[0]]
    model.transformer.pos.prepare(T, idx.device)
    for t in range(prefill, T):
        out.append(step(idx[:, t:t + 1], torch.tensor([t]), cache)[:, None])
        cache.pos += 1
    assert torch.equal(cache.tokens, idx)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("case", [c for c in STATIC if why_not_static(tiny(c)) is None])
def test_static_decode_step_equals_full_forward(case):
    """Every slot of the cache is read at every step, the unwritten ones masked: the same logits."""
    model = tiny(case)
    idx = torch.randint(0, 128, (2, seq_len(model)))
    with torch.no_grad():
        full = model(idx)[0]
    assert_close(static_logits(model, idx, prefill=5), full, **TIGHT)


@pytest.mark.parametrize("case", ["rope", "alibi"])
def test_static_decode_step_in_bf16_equals_the_cached_forward(case):
    """With weights cast to bf16 (generation's dtype), the static step gives the cached forward's logits: both
    keep the bias and mask in fp32. Bounds: bf16's rounding of the two paths' different sums, 2 units of bf16 at
    logits of about 1 (2^-7 each)."""
    model = tiny(case).to(torch.bfloat16)
    model.transformer.pos.float()
    idx = torch.randint(0, 128, (2, seq_len(model)))
    assert_close(static_logits(model, idx, prefill=5), cached_logits(model, idx, prefill=5).float(),
                 atol=2 ** -6, rtol=2 ** -7)


def test_compiled_decode_step_compiles_once_and_equals_eager():
    """torch.compile of the static step: one compilation for every token of a generation, the eager logits
    (fp32: only the order of sums differs, TIGHT)."""
    torch._dynamo.reset()
    model = tiny("alibi")
    idx = torch.randint(0, 128, (2, seq_len(model)))
    compiled = decode_step_of(model, compile=True)
    assert decode_step_of(model, compile=True) is compiled  # made once per model
    with torch._dynamo.config.patch(error_on_recompile=True):  # a second compilation fails the test
        assert_close(static_logits(model, idx, prefill=5, step=compiled), static_logits(model, idx, prefill=5),
                     **TIGHT)


def test_schemes_that_cannot_take_the_static_step_say_why():
    assert "change meaning with the length" in why_not_static(tiny("rope-dynamic"))
    model = tiny("rope")
    assert why_not_static(model) is None
    set_self_extend(model, 8, 2)
    assert "Self-Extend" in why_not_static(model)


def test_generate_takes_the_cached_forward_when_asked_and_gives_the_same_tokens():
    """static=False (the reference of scripts/check_decoding.py) never calls the static step; both paths give the
    same greedy tokens."""
    model = tiny("rope")
    prompt = torch.randint(0, 128, (2, 6))
    with patch.object(model, "decode_step", side_effect=AssertionError("the static step was taken")):
        reference = generate(model, prompt, 20, temperature=0, static=False)
    assert torch.equal(generate(model, prompt, 20, temperature=0), reference)


@pytest.mark.parametrize("case", STATIC)
def test_cached_equals_full_forward(case):
    model = tiny(case)
    idx = torch.randint(0, 128, (2, seq_len(model)))
    with torch.no_grad():
        full = model(idx)[0]
    assert_close(cached_logits(model, idx, prefill=5), full, **TIGHT)


@pytest.mark.parametrize("case", list(CASES))
def test_cached_equals_prefix_forward(case):
    model = tiny(case)
    idx = torch.randint(0, 128, (2, seq_len(model)))
    assert_close(cached_logits(model, idx, prefill=5), prefix_logits(model, idx), **TIGHT)


def test_dynamic_ntk_multilayer_cache_exact_past_training_length():
    model = tiny("rope-dynamic", n_layer=3)
    with torch.no_grad():  # sharper attention than the 0.02 init: stale keys in deep layers would show
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    idx = torch.randint(0, 128, (2, BLOCK + 16))
    assert_close(cached_logits(model, idx, prefill=5), prefix_logits(model, idx), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_chunked_prefill_equals_one_shot(case):
    model = tiny(case)
    idx = torch.randint(0, 128, (2, seq_len(model)))
    T1 = 11
    with torch.no_grad():
        one_shot = model(idx)[0]
        cache = model.make_kv_cache(2, idx.size(1))
        first = model(idx[:, :T1], kv_cache=cache)[0]
        second = model(idx[:, T1:], kv_cache=cache)[0]  # fewer queries than keys
    assert_close(second, one_shot[:, T1:], **TIGHT)  # dynamic too: both use the frequencies of the full length
    if case in STATIC:
        assert_close(first, one_shot[:, :T1], **TIGHT)


def test_alibi_fewer_queries_than_keys():
    """Queries at the end of a longer key sequence: the bias uses absolute distances, the mask stays causal."""
    model = tiny("alibi")
    idx = torch.randint(0, 128, (1, 40))
    with torch.no_grad():
        full = model(idx)[0]
        for T1 in (1, 20, 39):
            cache = model.make_kv_cache(1, 40)
            model(idx[:, :T1], kv_cache=cache)
            assert_close(model(idx[:, T1:], kv_cache=cache)[0], full[:, T1:], **TIGHT)


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_generation_same_with_and_without_cache(case):
    model = tiny(case)
    prompt = torch.randint(0, 128, (2, 10))
    n_new = seq_len(model) - 10  # past the training length where the scheme allows it
    with_cache = generate(model, prompt, n_new, temperature=0.0, use_cache=True)
    without = generate(model, prompt, n_new, temperature=0.0, use_cache=False)
    assert with_cache.shape == (2, seq_len(model))
    assert torch.equal(with_cache[:, :10], prompt)
    assert torch.equal(with_cache, without)


@pytest.mark.parametrize("case", [c for c in CASES if tiny(c).transformer.pos.max_len is None])
def test_prompt_longer_than_training_length(case):
    model = tiny(case)
    prompt = torch.randint(0, 128, (1, 2 * BLOCK + 3))
    with torch.no_grad():
        cache = model.make_kv_cache(1, prompt.size(1) + 4)
        logits = model(prompt, kv_cache=cache)[0]
        step = model(prompt[:, -1:], kv_cache=cache)[0]
    assert torch.isfinite(logits).all() and torch.isfinite(step).all()
    out = generate(model, prompt, 4, temperature=0.0)
    assert out.shape == (1, prompt.size(1) + 4)


def test_learned_refuses_past_its_table_up_front():
    model = tiny("learned")
    calls = []
    with pytest.raises(ValueError, match=f"trained with {BLOCK} positions") as err:
        generate(model, torch.randint(0, 128, (1, BLOCK - 4)), 10, on_token=calls.append)
    assert "prompt of 28 tokens + 10 new tokens" in str(err.value)
    assert calls == []  # refused before generating anything
    with pytest.raises(ValueError, match=f"trained with {BLOCK} positions"):  # a too-long prompt alone
        generate(model, torch.randint(0, 128, (1, BLOCK + 1)), 1, use_cache=False)
    cache = model.make_kv_cache(1, BLOCK + 8)  # the model itself refuses through the cache, as in training
    with torch.no_grad():
        model(torch.randint(0, 128, (1, BLOCK)), kv_cache=cache)
        with pytest.raises(ValueError, match=f"trained with {BLOCK} positions"):
            model(torch.randint(0, 128, (1, 1)), kv_cache=cache)
    assert generate(model, torch.randint(0, 128, (1, BLOCK - 4)), 4).shape == (1, BLOCK)  # exactly full is fine


def test_cache_overflow_is_a_clear_error():
    model = tiny("rope")
    cache = model.make_kv_cache(1, 8)
    with torch.no_grad(), pytest.raises(ValueError, match="KV cache holds 8 positions; 9 are needed"):
        model(torch.randint(0, 128, (1, 9)), kv_cache=cache)
