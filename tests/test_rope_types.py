"""LongRoPE and proportional RoPE (p-RoPE): frequencies equal transformers' own functions, p-RoPE is not our
partial rotary (and how the two relate), and cached decoding stays exact across LongRoPE's short -> long switch.
"""
import random

import pytest
import torch
from conftest import tiny_config
from torch.testing import assert_close

from model import GPT
from posenc.positions import RoPE, apply_rope, rope_cos_sin
from posenc.rope_scaling import rope_frequencies

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

transformers.utils.logging.set_verbosity_error()


def hf_frequencies(head_dim, params, seq_len=None, max_len=None):
    """transformers' own (inv_freq, attention_factor) for rope_parameters on a GPT-NeoX config."""
    config = transformers.GPTNeoXConfig(hidden_size=2 * head_dim, num_attention_heads=2, rope_parameters=dict(params),
                                        max_position_embeddings=max_len or 2048)
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, None, seq_len=seq_len)
    return inv_freq.double(), float(attention_factor)


def random_longrope(rng):
    """(head_dim, hf rope_parameters, our rope_scaling, rotated dims, max_position_embeddings) at random."""
    head_dim = 2 * rng.randint(2, 64)
    fraction = rng.choice([1.0, 0.5, 0.25, rng.uniform(0.1, 1)])
    d = int(head_dim * fraction)
    if d < 2 or d % 2:
        fraction, d = 1.0, head_dim
    L = rng.choice([16, 256, 4096, rng.randint(8, 100_000)])
    max_len = int(L * rng.uniform(1, 64))
    params = {"rope_type": "longrope", "rope_theta": 10 ** rng.uniform(2, 7), "partial_rotary_factor": fraction,
              "original_max_position_embeddings": L,
              "short_factor": [rng.uniform(0.5, 2) for _ in range(d // 2)],
              "long_factor": sorted(rng.uniform(1, 64) for _ in range(d // 2))}
    if rng.random() < 0.5:
        params["factor"] = rng.uniform(1, 64)
    if rng.random() < 0.3:
        params["attention_factor"] = rng.uniform(0.5, 2)
    ours = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
    ours["factor"] = params.get("factor", max_len / L)  # transformers' default, which scripts/import_hf.py writes in
    return head_dim, params, ours, d, max_len


def test_longrope_equals_transformers_on_both_sides_of_the_switch():
    rng = random.Random(0)
    for _ in range(200):
        head_dim, params, ours, d, max_len = random_longrope(rng)
        L = params["original_max_position_embeddings"]
        for seq_len in (None, 1, L, L + 1, rng.randint(1, 4 * L)):
            theirs, their_factor = hf_frequencies(head_dim, params, seq_len, max_len)
            inv_freq, attention_factor = rope_frequencies(d, params["rope_theta"], ours, seq_len)
            msg = f"{params} seq_len={seq_len}"
            assert_close(inv_freq, theirs, rtol=2e-6, atol=0, msg=msg)  # theirs is float32: its rounding, no more
            assert attention_factor == pytest.approx(their_factor, rel=1e-6), msg


def test_longrope_switches_exactly_past_the_original_length():
    scaling = {"rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": 16,
               "short_factor": [1.0, 1.5, 2.0, 2.5], "long_factor": [1.0, 2.0, 3.0, 4.0]}
    base = rope_frequencies(8, 1e4)[0]
    at_L, af = rope_frequencies(8, 1e4, scaling, 16)
    past, af_past = rope_frequencies(8, 1e4, scaling, 17)
    assert_close(base / at_L, torch.tensor(scaling["short_factor"], dtype=torch.float64))
    assert_close(base / past, torch.tensor(scaling["long_factor"], dtype=torch.float64))
    assert af == af_past == pytest.approx((1 + torch.tensor(4.0).log().item() / torch.tensor(16.0).log().item()) ** 0.5)


def test_proportional_equals_transformers():
    rng = random.Random(1)
    for _ in range(200):
        head_dim = 2 * rng.randint(1, 64)
        params = {"rope_type": "proportional", "rope_theta": 10 ** rng.uniform(2, 7),
                  "partial_rotary_factor": rng.choice([0.0, 0.25, 0.5, 0.75, 1.0, rng.random()]),
                  "factor": rng.choice([1.0, 4.0, rng.uniform(1, 64)])}
        theirs, their_factor = hf_frequencies(head_dim, params)
        ours = {k: v for k, v in params.items() if k != "rope_theta"}
        inv_freq, attention_factor = rope_frequencies(head_dim, params["rope_theta"], ours)
        assert_close(inv_freq, theirs, rtol=2e-6, atol=0, msg=str(params))
        assert attention_factor == their_factor == 1.0


def test_proportional_is_not_partial_rotary_but_equals_it_with_theta_to_the_p_and_moved_dims():
    """p-RoPE with fraction p keeps theta^(-2i/hs) on pairs (i, i + hs/2), i < p*hs/2; partial rotary with
    rotary_fraction p spreads theta'^(-2i/(p*hs)) over pairs (i, i + p*hs/2). The same rotation only for
    theta' = theta^p and the kept dims gathered at the front."""
    hs, p, theta, T = 16, 0.5, 1e4, 40
    q = torch.randn(1, 1, T, hs, dtype=torch.float64)
    pos = torch.arange(T)
    prop = dict(rope_scaling={"rope_type": "proportional", "factor": 1.0, "partial_rotary_factor": p})
    pr, partial = RoPE(tiny_config(n_head=2, n_embd=2 * hs, **prop)), RoPE(tiny_config(n_head=2, n_embd=2 * hs,
                                                                                     rotary_fraction=p))
    for scheme in (pr, partial):
        scheme.prepare(T, q.device)
    assert pr.rot_dim == hs and partial.rot_dim == hs * p
    a, b = pr.rotate(q, q, pos, 0)[0], partial.rotate(q, q, pos, 0)[0]
    assert (a - b).abs().max() > 0.1  # not the same scheme
    n = int(p * hs) // 2  # kept pairs
    moved = list(range(n)) + list(range(hs // 2, hs // 2 + n))  # p-RoPE's rotated dims, in partial rotary's order
    rest = [i for i in range(hs) if i not in moved]
    cos, sin = rope_cos_sin(pos, rope_frequencies(2 * n, theta ** p)[0])
    same = apply_rope(q[..., moved + rest], cos.double(), sin.double())
    assert_close(a[..., moved + rest], same, rtol=1e-5, atol=1e-5)  # rotation in fp32
    assert torch.equal(a[..., rest], q[..., rest].float().double())  # zero frequency: unrotated (fp32 rotation)


def test_proportional_needs_the_whole_head():
    with pytest.raises(ValueError, match="set rotary_fraction=1") as e:
        tiny_config(rotary_fraction=0.5, rope_scaling={"rope_type": "proportional", "factor": 1.0})
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="partial_rotary_factor in"):
        tiny_config(rope_scaling={"rope_type": "proportional", "factor": 1.0, "partial_rotary_factor": 1.5})


@pytest.mark.parametrize("bad, message", [
    ({"short_factor": [1.0, 1.0]}, "has 2 values; this model has 4 rotary pairs"),
    ({"long_factor": [1.0, -2.0, 1.0, 1.0]}, "list of positive numbers"),
    ({"long_factor": 4.0}, "list of positive numbers"),
])
def test_longrope_factors_that_do_not_fit_fail_with_one_line(bad, message):
    scaling = {"rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": 32, **bad}
    with pytest.raises(ValueError, match=message) as e:
        tiny_config(rope_scaling=scaling)  # head 8: 4 pairs
    assert "\n" not in str(e.value)


@torch.no_grad()
def test_cached_decoding_across_the_longrope_switch_equals_the_full_forward():
    """Every key cached while the sequence was short was rotated with the short factors; the step that crosses
    the original length must recompute them (vllm #27431, llama.cpp #24875, mlx-lm #660 kept them)."""
    L = 32
    scaling = {"rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": L,
               "short_factor": [1.0, 1.1, 1.3, 1.6], "long_factor": [1.0, 2.0, 5.0, 9.0]}
    model = GPT(tiny_config(n_layer=3, block_size=4 * L, rope_scaling=scaling)).eval()
    for p in model.parameters():  # sharper attention than the 0.02 init: stale keys would show
        if p.dim() == 2:
            p.normal_(0, 0.2)
    idx = torch.randint(0, 128, (2, L + 8))
    cache = model.make_kv_cache(2, idx.size(1))
    steps = [model(idx[:, :L - 4], kv_cache=cache)[0][:, -1]]
    steps += [model(idx[:, t:t + 1], kv_cache=cache)[0][:, -1] for t in range(L - 4, idx.size(1))]
    full = [model(idx[:, :t + 1], last_only=True)[0][:, -1] for t in range(L - 5, idx.size(1))]
    assert_close(torch.stack(steps), torch.stack(full), atol=1e-4, rtol=1e-5)
    # the reference is sharp: the same model with its short factors past L differs
    short = GPT(tiny_config(n_layer=3, block_size=4 * L, rope_scaling={**scaling, "long_factor": scaling["short_factor"]}))
    short.load_state_dict(model.state_dict())
    assert (short.eval()(idx)[0][:, -1] - full[-1]).abs().max() > 1e-3
