"""Causal attention with a logit bias (ALiBi, T5) or with explicit probabilities (explain.py), in blocks of queries,
so memory grows linearly with the length: no (heads, T, T) tensor ever exists.

A block of queries sees only the keys up to its last position (causal), and its bias is built for that slice:
(B, nh, block, Tk_block). On a GPU a logit bias goes to FlexAttention when it can (model.py); these blocks are
the path of every other case: the CPU, decoding with a cache, dropout.

  biased_attention(q, k, v, bias_fn, q_pos, k_pos, dropout)   the output; autograd through it on every device
  probed_attention(q, k, v, bias_fn, q_pos, k_pos, probe)     the same scores in fp32, each block's probabilities
                                                              handed to probe(probs, q_pos, k_pos)
  explicit_attention(q, k, v, q_pos, k_pos, logits_fn, probe) scores in fp32 that a scheme turns into logits itself
                                                              (CoPE, the forget gate), checkpointed per block

A bias that depends only on the distance (ALiBi, T5: `relative`) over consecutive positions needs no (block, keys)
tensor at all: with the keys in reverse order, entry (i, j) of a block's mask is the bias at distance d0 + i + j,
so the mask is a strided view of one vector of rows + keys biases, which the CPU's flash kernel reads as it is.

The bias stays in fp32 whatever q's dtype: in bf16, at 32k tokens, ALiBi's bias near -128 is spaced by 1.0 and
distances merge. The CPU's flash kernel takes an fp32 mask beside bf16 q (and runs faster with it than with a
bf16 one); on a GPU the blocks are computed in fp32 when a bias is present.
"""

import functools
import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from posenc.runtime import trim_freed_memory

# Elements (B x nh x queries x keys) of a block that is materialized (explicit masks, probabilities, the math
# kernel): 2^22 fp32 = 16 MiB each.
BLOCK_ELEMENTS = 2 ** 22
# Queries per block whose mask is a view (ALiBi, T5): it holds no (block, keys) tensor, so the count is set for
# speed at every length, not by memory. Fewer rows waste less of each block's masked upper triangle, but the CPU
# flash kernel runs small blocks at a higher cost per score. Measured alone on 2 cores (T5, 4 heads, hs 32, bf16,
# 2 threads), one layer's forward and backward at 4096 with 768, 1024, 1280, 2048 rows: 134, 127, 137, 143 ms
# (RoPE's causal call 91); a no-grad forward at 32k with 256, 512, 1024, 2048 rows: 3.08, 2.87, 2.28, 2.30 s
# (RoPE 2.02).
VIEW_ROWS = 1024
# Queries per block of band_gradient (fewer when B x nh is large: BLOCK_ELEMENTS bounds it). Its matmuls form
# rows x (rows + band - 1) pairs to use rows x band of them: measured alone at 4k (T5's band 128, 4 heads, bf16,
# 2 threads), 32, 64, 128, 256, 512 rows took 11.3, 8.5, 7.8, 10.0, 18.2 ms a layer (this VM: +-20% between runs);
# all blocks in one batched matmul, 24 ms (its large fp32 tensors are freshly mapped memory each time).
BAND_ROWS = 128
TRIM_BLOCKS = 16  # explicit_attention hands freed memory back to the system after this many blocks (runtime.trim_freed_memory)


def block_rows(B, nh, Tq, Tk, elements=None):
    """Queries per block: as many as keep B * nh * rows * Tk within `elements`, at least 1."""
    return max(1, min(Tq, (elements or BLOCK_ELEMENTS) // max(1, B * nh * Tk)))


def seen_keys(q_pos, k_pos):
    """How many leading keys a block of queries can see: keys at positions <= its last query's (positions
    increase along the sequence). One-dimensional positions only; otherwise every key."""
    if q_pos.dim() != 1 or k_pos.dim() != 1:
        return k_pos.size(-1)
    return int(torch.searchsorted(k_pos, q_pos[-1:], right=True))


def blocks(q, k, q_pos, k_pos, elements=None, rows=None):
    """(start, end, keys seen) of each block of queries: `rows` queries each, or as many as `elements` allow."""
    B, nh, Tq, _ = q.shape
    rows = rows or block_rows(B, nh, Tq, k.size(-2), elements)
    return [(s, min(s + rows, Tq), seen_keys(q_pos[s:s + rows], k_pos)) for s in range(0, Tq, rows)]


def consecutive(pos):
    """Positions p, p + 1, ..., as the model makes them without position ids (positions increase)."""
    return pos.dim() == 1 and (pos.numel() < 2 or int(pos[-1] - pos[0]) == pos.numel() - 1)


def causal_mask(bias_fn, q_pos, k_pos, device):
    """(nh or 1, Tq, Tk) fp32: the scheme's bias (or 0) with -inf on future keys."""
    bias = bias_fn(q_pos, k_pos) if bias_fn is not None else None
    bias = torch.zeros((), device=device) if bias is None else bias.float()
    future = k_pos[None, :] > q_pos[:, None]  # (Tq, Tk)
    return bias.masked_fill(future, -math.inf).expand(bias.size(0) if bias.dim() == 3 else 1, *future.shape)


def reversed_keys_mask(bias_fn, d0, rows, n, device):
    """(1, nh, rows, n) fp32 view for keys in reverse order: entry (i, j) is the bias at distance d0 + i + j (-inf
    below 0, a future key), read from one vector of rows + n - 1 biases. For a bias of the distance alone."""
    d = torch.arange(d0, d0 + rows + n - 1, device=device)
    top = d0 + rows + n - 2  # a query there sees every one of these distances at a key position >= 0
    bias = bias_fn(torch.tensor([top], device=device), top - d) if bias_fn is not None else None
    g = (torch.zeros(1, d.numel(), device=device) if bias is None else bias[:, 0].float())
    g = g.masked_fill(d < 0, -math.inf).contiguous()  # (nh, rows + n - 1)
    return g.as_strided((1, g.size(0), rows, n), (0, g.stride(0), 1, 1))


class Plan:
    """The blocks of one attention call and how each block's mask is made: a view over reversed keys when the bias
    depends on the distance alone and the positions are consecutive, else explicitly."""

    def __init__(self, q, k, bias_fn, q_pos, k_pos, relative):
        self.bias_fn, self.q_pos, self.k_pos, self.Tk = bias_fn, q_pos, k_pos, k.size(-2)
        self.flip = relative and consecutive(q_pos) and consecutive(k_pos)
        self.parts = blocks(q, k, q_pos, k_pos, rows=VIEW_ROWS if self.flip else None)
        if self.flip:
            self.q0, self.k0 = int(q_pos[0]), int(k_pos[0])

    def keys(self, k):
        """What the blocks read as keys (and values): reversed when the masks are views."""
        return k.flip(-2) if self.flip else k

    def block(self, s, e, n, k):
        """(mask (1, nh, rows, n), the block's n keys) of queries s:e, from what keys() returned."""
        if self.flip:
            mask = reversed_keys_mask(self.bias_fn, self.q0 + s - self.k0 - n + 1, e - s, n, k.device)
            return mask, k[..., self.Tk - n:, :]
        return causal_mask(self.bias_fn, self.q_pos[s:e], self.k_pos[:n], k.device)[None], k[..., :n, :]

    def unkeys(self, dk):
        return dk.flip(-2) if self.flip else dk


def biased_attention(q, k, v, bias_fn, q_pos, k_pos, dropout=0.0, relative=False, band=None, bias_params=()):
    """Causal attention of q (B, nh, Tq, hs) over k, v (B, nh, Tk, hs) at positions q_pos (Tq,), k_pos (Tk,), with
    bias_fn(q_pos, k_pos) -> (nh, Tq, Tk) added to the logits (None: the causal mask alone); (B, nh, Tq, hs).
    relative: the bias depends only on q_pos - k_pos (ALiBi, T5); band: it is also the same for every distance
    >= band (T5: max_distance), so its gradient needs the pairs closer than band only; bias_params: the tensors
    the bias learns (T5's table)."""
    if k.dtype != q.dtype:  # a cache kept in another dtype than the autocast one: the kernels take one dtype
        k, v = k.to(q.dtype), v.to(q.dtype)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *bias_params))
    learns = grad and bias_needs_grad(bias_fn, q_pos, k_pos)
    # Autocast would cast the fp32 mask to bf16 inside SDPA: q, k and v already have their compute dtype.
    with torch.autocast(q.device.type, enabled=False):
        if q.device.type == "cpu" and dropout == 0.0:
            plan = Plan(q, k, bias_fn, q_pos, k_pos, relative)
            if not grad:
                return flash_blocks(q, k, v, plan)[0]
            if not learns or (plan.flip and band is not None):
                # the CPU flash kernel's own backward, masks rebuilt per block: nothing T x T is kept
                plan.band = band if learns else None
                return BlockedFlashCPU.apply(q, k, v, plan, *(bias_params if learns else ()))
        return checkpointed_blocks(q, k, v, bias_fn, q_pos, k_pos, dropout, grad)


def flash_blocks(q, k, v, plan):
    """(output, log-sum-exp) of every block through the CPU flash kernel."""
    kk, vv, outs, lses = plan.keys(k), plan.keys(v), [], []
    for s, e, n in plan.parts:
        mask, kb = plan.block(s, e, n, kk)
        vb = vv[..., vv.size(-2) - n:, :] if plan.flip else vv[..., :n, :]
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q[..., s:e, :], kb, vb, attn_mask=mask)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, dim=-2), torch.cat(lses, dim=-1)


class BlockedFlashCPU(torch.autograd.Function):
    """The CPU flash kernel over blocks of queries: forward keeps the output and its log-sum-exp (linear in T),
    backward rebuilds each block's mask and calls the kernel's backward. A bias that learns and is constant past
    `plan.band` gets its gradient from the pairs closer than band (band_gradient)."""

    @staticmethod
    def forward(ctx, q, k, v, plan, *bias_params):
        out, lse = flash_blocks(q, k, v, plan)
        ctx.save_for_backward(q, k, v, out, lse, *bias_params)
        ctx.plan = plan
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, *params = ctx.saved_tensors
        plan, grad_out = ctx.plan, grad_out.contiguous()
        kk, vv = plan.keys(k), plan.keys(v)
        dq = torch.zeros_like(q)
        dk, dv = (torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in (k, v))  # in kk's order
        for s, e, n in plan.parts:
            mask, kb = plan.block(s, e, n, kk)
            keys = slice(kk.size(-2) - n, None) if plan.flip else slice(0, n)
            gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                grad_out[..., s:e, :], q[..., s:e, :], kb, vv[..., keys, :], out[..., s:e, :], lse[..., s:e],
                0.0, False, attn_mask=mask)
            dq[..., s:e, :] = gq
            dk[..., keys, :] += gk  # every block adds to the keys it saw, in fp32
            dv[..., keys, :] += gv
        dparams = band_gradient(plan, params, q, k, v, out, lse, grad_out) if params else ()
        return (dq, plan.unkeys(dk).to(k.dtype), plan.unkeys(dv).to(v.dtype), None, *dparams)


def band_gradient(plan, params, q, k, v, out, lse, grad_out):
    """The gradient of the bias's parameters. At a pair it is dS = P (dP - D) with D = dO·O per query, and every
    query's dS sums to 0 over its keys. The bias past the band is one value b_far, so its gradient, the sum of dS
    past the band, is minus the sum within it: only the pairs closer than band are needed. Per block of queries,
    q·k and dO·v are one matmul each over the keys the block reaches; a strided view then picks each query's
    band keys out of them (a skewed diagonal band), so the softmax terms are formed for those pairs alone and
    summed by distance with no scatter. Then one backward through the bias of each distance 0..band."""
    band, bias_fn = plan.band, plan.bias_fn
    B, nh, Tq, hs = q.shape
    offset = plan.q0 - plan.k0  # the key index at query 0's own position
    # The keys and values padded with band - 1 zeros in front, so that every query has band keys to its left:
    # query i's key at distance band - 1 - j is padded row i + offset + j.
    # Each block's slices go to fp32 as it is reached: small tensors that stay in cache, not whole fp32 copies.
    kp, vp = (F.pad(t, (0, 0, band - 1, 0)) for t in (k, v))
    with torch.no_grad():  # the bias at distances band - 1, ..., 0, the order of a query's band keys
        near_bias = bias_fn(q.new_tensor([band - 1], dtype=torch.long),
                            torch.arange(band, device=q.device))[:, 0].float()  # (nh, band)
    by_band = torch.zeros(nh, band, device=q.device)  # sums of dS, distances band - 1, ..., 0
    rows = min(BAND_ROWS, block_rows(B, nh, Tq, BAND_ROWS + band))
    for s in range(0, Tq, rows):
        e = min(s + rows, Tq)
        keys = slice(s + offset, e + offset + band - 1)  # padded keys the block reaches: (e - s) + band - 1
        go = grad_out[..., s:e, :].float()
        scores = (q[..., s:e, :].float() * (1 / math.sqrt(hs))) @ kp[..., keys, :].float().transpose(-2, -1)
        dp = go @ vp[..., keys, :].float().transpose(-2, -1)  # (B, nh, rows, rows + band - 1)
        d_out = (go * out[..., s:e, :].float()).sum(-1)  # D, (B, nh, rows)
        # Row i's band starts at column i: a view with a row stride one longer than the rows'.
        skew = lambda t: t.as_strided((*t.shape[:3], band), (*t.stride()[:2], t.stride(2) + 1, 1))  # noqa: E731
        ds = (skew(scores) + near_bias[:, None, :]).sub_(lse[..., s:e, None]).exp_()  # P on the band
        ds *= skew(dp).sub(d_out[..., None])
        if s + offset < band - 1:  # the first queries' bands start before key 0: those pairs are padding
            key = torch.arange(s, e, device=q.device)[:, None] + offset + torch.arange(band, device=q.device) - band + 1
            ds *= key >= 0
        by_band += ds.sum((0, 2))
    near = by_band.flip(1)  # by distance 0, ..., band - 1
    by_distance = torch.cat([near, -near.sum(1, keepdim=True)], dim=1)  # and every distance >= band
    with torch.enable_grad():
        d = torch.arange(band, -1, -1, device=q.device)  # keys at distances band, band - 1, ..., 0 of position band
        bias = bias_fn(d.new_tensor([band]), band - d)[:, 0]  # (nh, band + 1) in the order of d
        return torch.autograd.grad(bias, params, by_distance.flip(1).to(bias.dtype), allow_unused=True)


def attention_by_distance(parts, v, q_pos, k_pos):
    """Causal attention under one softmax whose scores come from different q and k by distance (Self-Extend:
    exact positions near, grouped ones far). parts: [(q, k, lo, hi)], each scoring the distances in [lo, hi)
    (hi None: no end), together every distance >= 0 once. Each part runs through the CPU flash kernel in blocks
    of queries, its distances kept by a mask that is a view (as ALiBi's); its output and log-sum-exp over its
    own keys are then weighted into the softmax over all keys. Consecutive positions, no gradient.
    (B, nh, Tq, hs)."""
    outs, lses = [], []
    with torch.autocast(q_pos.device.type, enabled=False):
        for q, k, lo, hi in parts:
            def keep(qp, kp, lo=lo, hi=hi):  # 0 where the part scores the pair, -inf elsewhere: (1, Tq, Tk)
                d = qp[:, None] - kp[None, :]
                inside = (d >= lo) & (d < hi) if hi is not None else d >= lo
                return torch.zeros((), device=d.device).masked_fill(~inside, -math.inf)[None]
            out, lse = flash_blocks(q, k, v.to(q.dtype), Plan(q, k, keep, q_pos, k_pos, relative=True))
            # A query with no key in the part (no far keys yet) gets lse 0 from the kernel: it must weigh nothing.
            has_keys = (q_pos - k_pos[0] >= lo)[None, None, :]
            outs.append(out.float())
            lses.append(lse.float().masked_fill(~has_keys, -math.inf))
    total = torch.stack(lses).logsumexp(0)  # (B, nh, Tq): over every key
    return sum(out * (lse - total).exp()[..., None] for out, lse in zip(outs, lses)).to(v.dtype)


def bias_needs_grad(bias_fn, q_pos, k_pos):
    """Whether the bias has parameters to learn (T5's table): tried on one pair of positions."""
    if bias_fn is None:
        return False
    bias = bias_fn(q_pos[:1], k_pos[:1])
    return bias is not None and bias.requires_grad


def checkpointed_blocks(q, k, v, bias_fn, q_pos, k_pos, dropout, grad):
    """Blocks through SDPA with explicit masks: a bias to learn (T5's table, through SDPA's math kernel), dropout,
    or a GPU. With gradients each block is recomputed in backward, so its bias and probabilities live only there."""
    upcast = q.device.type != "cpu" and q.dtype != torch.float32  # GPU kernels take a mask in q's dtype: fp32
    qf, kf, vf = (t.float() for t in (q, k, v)) if upcast else (q, k, v)
    out = []
    for s, e, n in blocks(q, k, q_pos, k_pos):
        args = (qf[..., s:e, :], kf[..., :n, :], vf[..., :n, :], q_pos[s:e], k_pos[:n])
        out.append(checkpoint(_block, *args, bias_fn, dropout, use_reentrant=False) if grad
                   else _block(*args, bias_fn, dropout))
    return torch.cat(out, dim=-2).to(q.dtype)


def _block(q, k, v, q_pos, k_pos, bias_fn, dropout):
    mask = causal_mask(bias_fn, q_pos, k_pos, q.device)
    if mask.dtype != q.dtype and q.device.type != "cpu":
        mask = mask.to(q.dtype)  # only fp32 q reaches here on a GPU (upcast above): no precision lost
    if mask.requires_grad and mask.dtype != q.dtype:  # SDPA's math kernel (a bias to learn) takes one dtype
        q, k, v = q.float(), k.float(), v.float()
    # (1, nh, Tq, Tk): with a 4-d mask the CPU takes SDPA's flash kernel (a 3-d one falls back to the math kernel)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None], dropout_p=dropout)


def decode_attention(q, k, v, bias, q_pos, k_pos):
    """One query per sequence, q (B, nh, 1, hs), over a whole static cache k, v (B, nh, max_len, hs): the keys past
    q_pos (slots not yet written) are masked, so the shapes never change (model.GPT.decode_step). bias: the
    scheme's (nh, 1, max_len) or None. The mask stays fp32 on the CPU (its flash kernel takes it with bf16 q: an
    ALiBi bias of -100 is off by 0.25 in bf16); a GPU kernel takes q's dtype, so with a bias q, k, v go to fp32."""
    mask = causal_mask(None if bias is None else lambda *_: bias, q_pos, k_pos, q.device)[None]  # (1, nh|1, 1, Tk)
    if q.device.type != "cpu" and q.dtype != mask.dtype:
        if bias is None:
            mask = mask.to(q.dtype)  # 0 and -inf: exact in any dtype
        else:
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def explicit_attention(q, k, v, q_pos, k_pos, logits_fn=None, probe=None, elements=None):
    """Causal attention with each block's scores formed explicitly, in fp32, a block of queries at a time: scores =
    q·k / √hs with the future keys (by position) at -inf, then logits_fn(scores, s, e, n), the logits of queries s:e
    over the first n keys (B, nh, rows, n), for a scheme that forms them from the scores (CoPE counts with them) or
    from per-token gates (the forget gate); None: the scores themselves. probe(probs (B, nh, rows, n), q_pos (rows,),
    k_pos (n,)) sees each block's probabilities (explain.py), and the output is made from those very probabilities.
    With gradients each block is checkpointed: its scores and probabilities exist only while it is computed, in
    forward and again in backward, so memory grows linearly with the length. (B, nh, Tq, hs) in v's dtype."""
    grad = torch.is_grad_enabled()
    qf = q.float() * (1 / math.sqrt(q.size(-1)))  # the scale folded into q once, not into every score
    kf, vf, out = k.float().contiguous(), v.float().contiguous(), []
    with torch.autocast(q.device.type, enabled=False):  # fp32 scores whatever the model's compute dtype
        for i, (s, e, n) in enumerate(blocks(q, k, q_pos, k_pos, elements)):
            if i % TRIM_BLOCKS == TRIM_BLOCKS - 1 and q.device.type == "cpu":
                trim_freed_memory()  # the blocks' freed tensors, of ever new sizes, would stay on the heap as holes
            logits = None if logits_fn is None else functools.partial(logits_fn, s=s, e=e, n=n)
            block = functools.partial(_explicit_block, q_pos=q_pos[s:e], k_pos=k_pos[:n], logits_fn=logits,
                                      probe=probe)
            args = (qf[..., s:e, :], kf[..., :n, :], vf[..., :n, :])
            out.append(checkpoint(block, *args, use_reentrant=False) if grad else block(*args))
    return torch.cat(out, dim=-2).to(v.dtype)


def _explicit_block(q, k, v, q_pos, k_pos, logits_fn, probe):
    scores = q @ k.transpose(-2, -1)  # (B, nh, rows, n)
    m = seen_keys(q_pos[:1], k_pos)  # keys before m are past for every query of the block: only the rest is masked
    scores[..., m:].masked_fill_(k_pos[None, m:] > q_pos[:, None], -math.inf)
    probs = (scores if logits_fn is None else logits_fn(scores)).softmax(-1)
    if probe is not None:
        probe(probs, q_pos, k_pos)
    return probs @ v


def probed_attention(q, k, v, bias_fn, q_pos, k_pos, probe, elements=None):
    """Attention with its probabilities formed explicitly (explicit_attention), q·k / √hs + the bias, in fp32, causal
    by absolute position; probe(probs, q_pos, k_pos) sees each block."""
    def biased(scores, s, e, n):
        bias = bias_fn(q_pos[s:e], k_pos[:n]) if bias_fn is not None else None
        return scores if bias is None else scores + bias.float()

    return explicit_attention(q, k, v, q_pos, k_pos, biased, probe, elements)
