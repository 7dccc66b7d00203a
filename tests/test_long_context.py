"""Long context in memory linear in T: attention in blocks of queries equals the whole-bias attention (logits and
gradients, prefill and cached decoding), explain.py's statistics per block equal those of the whole matrices, and
the dtype and precision contracts of the long path (the KV cache's dtype under autocast, ALiBi's bias in fp32,
the loss's recomputation only past its memory budget)."""

import math
from unittest.mock import patch

import pytest
import torch
from torch.testing import assert_close

import explain
import model as model_module
from conftest import randomized, tiny_config
from model import GPT, chunked_cross_entropy, record_attention
from posenc import attention
from posenc.positions import ALiBi


def full_bias_attention(q, k, v, bias_fn, q_pos, k_pos, *args, **kwargs):
    """The reference: the whole (nh, Tq, Tk) bias, the causal mask, a plain softmax, in fp32."""
    bias = bias_fn(q_pos, k_pos).float().masked_fill(k_pos[None, :] > q_pos[:, None], -math.inf)
    scores = q.float() @ k.float().transpose(-2, -1) / math.sqrt(q.size(-1)) + bias  # (B, nh, Tq, Tk)
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


OPTIONS = {"t5": {"num_buckets": 8, "max_distance": 20},  # the last bucket (every distance >= 20) within 64 tokens
           "fire": {"threshold": 16}}  # queries past FIRE's threshold within 64 tokens


def config(scheme):
    return tiny_config(pos_encoding=scheme, block_size=64, pos_options=OPTIONS.get(scheme))


def small_blocks(rows):
    """Blocks of `rows` queries at T = 64 with 4 heads, in every blocked path."""
    return patch.multiple(attention, BLOCK_ELEMENTS=4 * rows * 64, VIEW_ROWS=rows)


# fp32 throughout: the blocked kernels sum in another order than the reference (per block, flash tiles), which moves
# the last bits: 1e-5 relative on logits of size ~1, 1e-4 relative on gradients (sums over 64 x 64 pairs).
@pytest.mark.parametrize("scheme", ["alibi", "t5", "kerple", "fire"])
def test_blocked_attention_equals_the_whole_bias_in_logits_and_gradients(scheme):
    model = randomized(GPT(config(scheme)))
    idx, targets = torch.randint(0, 128, (2, 2, 64)).unbind(0)

    def run():
        model.zero_grad()
        loss = model(idx, targets)[1]
        loss.backward()
        return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    with small_blocks(5):  # 13 blocks, the last one short
        loss, grads = run()
    with patch.object(model_module, "biased_attention", full_bias_attention):
        ref_loss, ref_grads = run()
    assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    if scheme == "t5":
        assert ref_grads["transformer.pos.table"].abs().min() > 0  # every bucket learns: the far one too
    if scheme in ("kerple", "fire"):  # every parameter of the bias learns
        assert all(ref_grads[n].abs().sum() > 0 for n, _ in model.named_parameters() if ".pos." in n)
    for name in grads:
        assert_close(grads[name], ref_grads[name], atol=1e-7, rtol=1e-4, msg=name)


@pytest.mark.parametrize("band_rows", [7, 512])  # 10 blocks (the first 3 reach before key 0), or one block
def test_t5_table_gradient_in_band_blocks_equals_the_whole_bias(band_rows):
    model = randomized(GPT(config("t5")))
    idx, targets = torch.randint(0, 128, (2, 2, 64)).unbind(0)
    grads = []
    for blocked in (True, False):
        model.zero_grad()
        with patch.object(attention, "BAND_ROWS", band_rows), \
                patch.object(model_module, "biased_attention", attention.biased_attention if blocked else full_bias_attention):
            model(idx, targets)[1].backward()
        grads.append(model.transformer.pos.table.grad.clone())
    assert_close(*grads, atol=1e-7, rtol=1e-4)  # as above: sums in another order


@pytest.mark.parametrize("scheme", ["alibi", "t5", "kerple", "fire"])
def test_blocked_attention_with_a_kv_cache_equals_the_whole_bias(scheme):
    model = randomized(GPT(config(scheme))).eval()
    idx = torch.randint(0, 128, (2, 64))
    with torch.no_grad():
        with patch.object(model_module, "biased_attention", full_bias_attention):
            ref = model(idx)[0]
        with small_blocks(5):
            cache = model.make_kv_cache(2, 64)
            pieces = [model(idx[:, a:b], kv_cache=cache)[0] for a, b in ((0, 40), (40, 52), (52, 53), (53, 64))]
    assert_close(torch.cat(pieces, dim=1), ref, atol=1e-5, rtol=1e-5)


def test_alibi_bias_keeps_distances_apart_at_32k_under_bf16_autocast():
    """Two keys 100 tokens apart, 32k tokens back, seen by the gentlest head (slope 1/256): their biases, -125 and
    -124.6, differ by 0.39 in fp32; in bf16 (spacing 0.5 there) they become -125 and -124.5. With q·k = 0 and
    values 0 and 1, the output is the second key's weight: sigmoid(0.39) = 0.596, not sigmoid(0.5) = 0.622. The
    tolerance, 0.01, is bf16's rounding of the output (spacing 2^-8 near 0.6) with room."""
    scheme = ALiBi(tiny_config(pos_encoding="alibi", n_head=2))
    q = torch.zeros(1, 2, 1, 8, dtype=torch.bfloat16)
    k = torch.zeros(1, 2, 2, 8, dtype=torch.bfloat16)
    v = torch.tensor([0.0, 1.0]).view(1, 1, 2, 1).expand(1, 2, 2, 8).to(torch.bfloat16)
    q_pos, k_pos = torch.tensor([32000]), torch.tensor([0, 100])
    bias_fn = lambda qp, kp: scheme.attn_bias(qp, kp, 0)  # noqa: E731
    with torch.autocast("cpu", torch.bfloat16):
        y = attention.biased_attention(q, k, v, bias_fn, q_pos, k_pos, relative=True)
    assert y.dtype == torch.bfloat16
    want = torch.sigmoid(torch.tensor(100 / 256))
    assert abs(y[0, 1, 0, 0].float() - want) < 0.01, f"{y[0, 1, 0, 0].item():.4f} vs {want:.4f}"


def test_alibi_view_mask_keeps_distances_apart_at_32k_under_bf16_autocast():
    """The same contract where the mask is a strided view (consecutive keys, posenc/attention.reversed_keys_mask):
    101 keys at positions 0..100 seen from 32,000 by the gentlest head, q·k = 0, value 1 on the last key alone.
    Its weight is softmax of the fp32 biases, 0.01196; with the biases rounded to bf16 (spacing 0.5 there) it
    would be 0.01326. The tolerance, 1e-4, is bf16's rounding of the output (spacing 2^-14 near 0.012) with room."""
    scheme = ALiBi(tiny_config(pos_encoding="alibi", n_head=2))
    q = torch.zeros(1, 2, 1, 8, dtype=torch.bfloat16)
    k = torch.zeros(1, 2, 101, 8, dtype=torch.bfloat16)
    v = torch.zeros(1, 2, 101, 8, dtype=torch.bfloat16)
    v[..., -1, :] = 1.0
    q_pos, k_pos = torch.tensor([32000]), torch.arange(101)
    bias_fn = lambda qp, kp: scheme.attn_bias(qp, kp, 0)  # noqa: E731
    assert attention.Plan(q, k, bias_fn, q_pos, k_pos, relative=True).flip  # the view path
    with torch.autocast("cpu", torch.bfloat16):
        y = attention.biased_attention(q, k, v, bias_fn, q_pos, k_pos, relative=True)
    want = torch.softmax(-(32000 - k_pos.double()) / 256, 0)[-1]
    assert abs(y[0, 1, 0, 0].double() - want) < 1e-4, f"{y[0, 1, 0, 0].item():.5f} vs {want:.5f}"


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_the_kv_cache_takes_the_autocast_dtype_so_flex_prefill_gets_one_dtype():
    """Evaluation keeps fp32 weights under bf16 autocast: q is bf16, and a cache made in the weights' dtype held k
    and v in fp32, which a compiled FlexAttention refuses (Mixed query, key, and value dtype). The prefill must
    hand FlexAttention one dtype; attn_backend=flex runs it on the CPU."""
    model = GPT(tiny_config(pos_encoding="alibi", attn_backend="flex", block_size=64)).eval()
    seen = []
    real = model_module.flex_causal

    def spy(q, k, v, score_mod):
        seen.append((q.dtype, k.dtype, v.dtype))
        return real(q, k, v, score_mod)

    idx = torch.randint(0, 128, (1, 32))
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16), patch.object(model_module, "flex_causal", spy):
        cache = model.make_kv_cache(1, 40)
        model(idx, kv_cache=cache)
        model(idx[:, :1], kv_cache=cache)  # a decode step: the blocked path, from the same cache
    assert seen == [(torch.bfloat16,) * 3] * 2  # one prefill per layer
    assert cache.k.dtype == cache.v.dtype == torch.bfloat16


def test_the_loss_is_recomputed_only_past_its_memory_budget():
    """Several chunks with gradients: the logits are kept (no checkpoint) while they fit the budget, and each
    chunk is checkpointed past it; the loss and its gradient are the same either way."""
    x = torch.randn(2, 50, 16, requires_grad=True)
    w = torch.randn(40, 16, requires_grad=True)
    t = torch.randint(0, 40, (2, 50))
    calls = []
    real = model_module.checkpoint

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    results = []
    for fraction, want_calls in ((0.25, 0), (1e-12, 7)):  # 100 tokens in chunks of 16: 7 chunks
        calls.clear()
        with patch.object(model_module, "checkpoint", spy), patch.object(model_module, "LOSS_MEMORY_FRACTION", fraction):
            loss = chunked_cross_entropy(x, w, t, chunk=16)
        assert len(calls) == want_calls
        results.append((loss, *torch.autograd.grad(loss, (x, w))))
    for a, b in zip(*results):
        assert_close(a, b, atol=0, rtol=0)


def full_matrix_statistics(probs_by_layer, T, L):
    """explain.py's statistics as they were computed before blocks: from each layer's whole (B, nh, T, T)
    probabilities, with (T, T) distance buckets, in float64."""
    edges = explain.distance_edges(T, L)
    distance = torch.arange(T)[:, None] - torch.arange(T)[None, :]
    bucket = torch.bucketize(distance.clamp(min=0), torch.tensor(edges[1:]), right=True)
    past = torch.arange(T) >= L
    out = []
    for probs in probs_by_layer:
        p = probs.double().sum((0, 1))
        mass = torch.zeros(2, len(edges) - 1, dtype=torch.float64)
        for half, rows in enumerate((~past, past)):
            if rows.any():
                mass[half] = torch.zeros(len(edges) - 1, dtype=torch.float64).index_add_(
                    0, bucket[rows].flatten(), p[rows].flatten()) / rows.sum()
        entropy = -(probs.double() * probs.double().clamp(min=1e-30).log()).sum(-1).sum((0, 1))
        out.append((mass, entropy, explain.far_share(p, L)))
    return out


def test_explain_statistics_per_block_equal_those_of_the_whole_matrices():
    """AttentionStats fed blocks of 5 queries gives what the whole (T, T) probabilities give. Tolerance 1e-6
    relative: the blocks sum each row in fp32 (the reference in float64) over at most 40 keys."""
    model = randomized(GPT(tiny_config(pos_encoding="alibi", block_size=64))).eval()
    T, L = 40, 16
    idx = torch.randint(0, 128, (1, T))
    whole = {}

    def keep_whole(layer, p, q_pos, k_pos):
        whole.setdefault(layer, torch.zeros(1, 4, T, T))[:, :, q_pos[:, None], k_pos[None, :]] = p

    stats = explain.AttentionStats(2, T, L)
    with torch.no_grad(), small_blocks(5):
        with record_attention(model, keep_whole):
            model(idx)
        with record_attention(model, stats):
            model(idx)
    for layer, (mass, entropy, far) in enumerate(full_matrix_statistics([whole[0], whole[1]], T, L)):
        assert_close(stats.mass_share(layer), mass, atol=1e-9, rtol=1e-6)
        assert_close(stats.entropy[layer], entropy, atol=1e-9, rtol=1e-6)
        assert_close(stats.far[layer], far, atol=1e-9, rtol=1e-6)
    assert stats.far[:, L:].sum() > 0 and stats.mass[:, 1].sum() > 0  # past L, something to compare


def test_the_attention_probe_trims_the_heap_every_few_blocks():
    """probed_attention (explain.py) hands freed memory back every TRIM_BLOCKS blocks (runtime.trim_freed_memory):
    without it explain.py peaked at 3.1 GiB resident at 32k for ~0.6 GiB of live tensors. On glibc the call must
    work; elsewhere it does nothing."""
    import platform
    from posenc import runtime
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert runtime.trim_freed_memory()
    q = k = v = torch.randn(1, 2, 64, 8)
    pos = torch.arange(64)
    with small_blocks(1), patch.object(attention, "trim_freed_memory") as trimmed:
        n_blocks = len(attention.blocks(q, k, pos, pos))  # 32 blocks of two queries
        attention.probed_attention(q, k, v, None, pos, pos, lambda *a: None)
    assert n_blocks == 32 and trimmed.call_count == n_blocks // attention.TRIM_BLOCKS
