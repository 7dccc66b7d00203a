"""A GPT-2-style decoder whose position scheme is one config field (nanoGPT in spirit).

Module names follow GPT-2 (wte, c_attn, c_proj, ln_f) so weights map key for key. The position scheme is
a module from positions.SCHEMES; the model calls its hooks unconditionally and never asks its name.
"""

import contextlib
import functools
import math
import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from posenc.attention import biased_attention, decode_attention, probed_attention
from posenc.config import at_least, check_fields
from posenc.positions import SCHEMES

try:  # FlexAttention runs ALiBi without a T x T bias tensor (torch >= 2.5)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:
    flex_attention = None

LOSS_CHUNK_LOGITS = 2 ** 25  # logits per cross-entropy chunk (128 MiB in fp32): 8192 tokens at a vocabulary of
# 4096, 667 at GPT-2's; full fp32 logits at 32k x 50k vocab would be 6.6 GB
LOSS_MEMORY_FRACTION = 0.25  # recompute the loss's logits in backward only past this share of the device's memory
H100_BF16_PEAK_FLOPS = 989e12  # dense bf16, the denominator of MFU
GELU_APPROXIMATION = {"gelu": "none", "gelu_tanh": "tanh"}  # GPTConfig.activation -> nn.GELU's approximate
RUNTIME_FIELDS = ("dropout", "activation_checkpointing", "attn_backend")  # GPTConfig keys that are not the
# architecture: a resumed run, or one started from another's weights, may set them anew


@dataclass
class GPTConfig:
    block_size: int = 256  # the training length; learned positions have exactly this many rows
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 64 for efficiency
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False  # biases in Linears and LayerNorms: GPT-2 had them; a bit better and faster without
    pos_encoding: str = "rope"  # a key of positions.SCHEMES (docs/schemes.md describes each)
    pos_options: dict | None = None  # the scheme's own settings, e.g. {"nope_interval": 2} (its `options`)
    rope_theta: float = 10000.0  # RoPE base
    rope_layout: Literal["half", "interleaved"] = "half"  # half: GPT-NeoX / Hugging Face; interleaved: Meta / GPT-J
    rotary_fraction: float = 1.0  # partial rotary: rotate only this fraction of each head
    rope_scaling: dict | None = None  # Hugging Face rope_scaling dict; see posenc/rope_scaling.py
    activation: Literal["gelu", "gelu_tanh"] = "gelu"  # exact GELU (nanoGPT) | GPT-2's tanh one, llama.cpp's only
    activation_checkpointing: bool = False  # recompute blocks in backward: long context in less memory
    attn_backend: Literal["auto", "sdpa", "flex"] = "auto"  # how a logit bias is applied (flex: FlexAttention)

    def __post_init__(self):
        check_fields(self)
        if self.pos_encoding not in SCHEMES:
            raise ValueError(f"unknown pos_encoding {self.pos_encoding!r}; choose one of {', '.join(SCHEMES)}")
        at_least(self, 1, "block_size", "vocab_size", "n_layer", "n_head", "n_embd")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"bad value {self.dropout!r} for config key 'dropout': expected a number in [0, 1)")
        at_least(self, 0.0, "rope_theta", "rotary_fraction")
        SCHEMES[self.pos_encoding].check_config(self)  # the scheme's own rules (scaling, rotary dims, ...)


class KVCache:
    """Keys (already rotated) and values for every layer, allocated once, with an explicit position.

    It also keeps the tokens: when the meaning of positions changes with the length (dynamic NTK), every
    layer's cached keys and values are stale, and the model recomputes them from the tokens. So cached
    decoding equals the full forward for every scheme and scaling, exactly.
    """

    def __init__(self, n_layer, batch_size, n_head, max_len, head_size, device, dtype=None):
        self.shape = (n_layer, batch_size, n_head, max_len, head_size)
        self.k = self.v = None  # allocated by the first update, in its dtype unless `dtype` is given
        self.dtype, self.device = dtype, device
        self.gates = None  # the scheme's per-token gates (PositionScheme.gates), allocated by the first update_gates
        self.tokens = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.max_len = max_len
        self.pos = 0  # tokens already in the cache
        self.key = None  # the position scheme's cache_key when the cache was filled

    def update(self, layer, k, v, at=None):
        """Write k, v (B, nh, T, hs) after the cached ones; return every key and value so far. at: the static
        step's position tensor (GPT.decode_step): one token written there in place, and the whole cache returned."""
        if self.k is None:  # the keys' own dtype (bf16 under autocast): attention takes q, k, v in one dtype
            dtype = self.dtype or k.dtype
            self.k, self.v = (torch.zeros(self.shape, device=self.device, dtype=dtype) for _ in range(2))
        if at is not None:
            self.k[layer].index_copy_(2, at, k.to(self.k.dtype))
            self.v[layer].index_copy_(2, at, v.to(self.v.dtype))
            return self.k[layer], self.v[layer]
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def update_gates(self, layer, gates):
        """Write the new tokens' gates (B, nh, T) after the cached ones, in fp32; return every token's so far."""
        if self.gates is None:
            self.gates = torch.zeros(self.shape[:3] + (self.max_len,), device=self.device)
        end = self.pos + gates.size(-1)
        self.gates[layer, :, :, self.pos:end] = gates
        return self.gates[layer, :, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.dropout, self.backend = config.n_head, config.dropout, config.attn_backend
        self.probe = None  # set by record_attention: called with (layer, probabilities, q_pos, k_pos) in eval

    def forward(self, x, scheme, q_pos, k_pos, kv_cache=None, layer=0, static=False):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        q, k = scheme.rotate(q, k, q_pos, layer)
        gates = scheme.gates(x, layer)  # (B, nh, T) or None: what a data-dependent scheme reads of every key
        if kv_cache is not None:  # (B, nh, Tk, hs): every key so far, or every slot of the static step
            k, v = kv_cache.update(layer, k, v, at=q_pos if static else None)
            if gates is not None:
                gates = kv_cache.update_gates(layer, gates)
        if static:
            y = decode_attention(q, k, v, scheme.attn_bias(q_pos, k_pos, layer), q_pos, k_pos)
        else:
            y = self.attend(q, k, v, scheme, q_pos, k_pos, layer, gates)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def attend(self, q, k, v, scheme, q_pos, k_pos, layer, gates=None):
        probe = None if self.probe is None else functools.partial(self.probe, layer)
        # a scheme that attends itself (CoPE, the forget gate, RoPE with Self-Extend)
        y = scheme.attend(q, k, v, q_pos, k_pos, layer, gates, probe)
        if y is not None:
            return y
        bias_fn = functools.partial(scheme.attn_bias, layer=layer)  # (q_pos, k_pos) -> (nh, Tq, Tk) or None
        if probe is not None:
            return probed_attention(q, k, v, bias_fn, q_pos, k_pos, probe)
        dropout = self.dropout if self.training else 0.0
        Tq, Tk = q.size(-2), k.size(-2)
        if k.dtype != q.dtype:  # a KV cache in another dtype than autocast's: every kernel takes one dtype
            k, v = k.to(q.dtype), v.to(q.dtype)
        score_mod = scheme.score_mod(layer)
        if score_mod is not None and Tq == Tk and dropout == 0.0 and self.use_flex(q):
            return flex_causal(q, k, v, score_mod)
        if (Tq == Tk or Tq == 1) and scheme.attn_bias(q_pos[:1], k_pos[:1], layer) is None:
            # no bias: the flash kernel; one new query sees every key
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=Tq > 1)
        # blocks of queries, each with its slice of the bias
        return biased_attention(q, k, v, bias_fn, q_pos, k_pos, dropout, scheme.relative_bias, scheme.bias_band,
                                tuple(p for p in scheme.parameters() if p.requires_grad))

    def use_flex(self, q):
        return flex_attention is not None and q.is_cuda if self.backend == "auto" else self.backend == "flex"


@functools.cache
def causal_block_mask(T, device):
    """FlexAttention's causal BlockMask for length T: built once per length, never per call."""
    return create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, T, T, device=device)


def flex_causal(q, k, v, score_mod):
    """FlexAttention with a causal block mask; compiled on GPU (uncompiled it materializes the scores)."""
    flex = compiled_flex_attention() if q.is_cuda else flex_attention
    return flex(q, k, v, score_mod=score_mod, block_mask=causal_block_mask(q.size(-2), q.device))


compiled_flex_attention = functools.cache(lambda: torch.compile(flex_attention))


@contextlib.contextmanager
def record_attention(model, probe):
    """Within the block, every attention layer of `model` calls probe(layer, probs, q_pos, k_pos) with its
    probabilities for a block of queries at a time (posenc.attention.probed_attention): probs (B, nh, rows, keys)
    in fp32, each row summing to 1 over the keys it may see, for the queries at q_pos and the keys at k_pos. For
    analysis in eval (explain.py): a block at a time, so memory grows linearly with the length."""
    attns = [m for m in model.modules() if isinstance(m, CausalSelfAttention)]
    for a in attns:
        a.probe = probe
    try:
        yield
    finally:
        for a in attns:
            a.probe = None


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate=GELU_APPROXIMATION[config.activation])
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, scheme, q_pos, k_pos, kv_cache=None, layer=0, static=False):
        x = x + self.attn(self.ln_1(x), scheme, q_pos, k_pos, kv_cache, layer, static)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            pos=SCHEMES[config.pos_encoding](config),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by 1/sqrt(2 * n_layer)
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        self.transformer.pos.init_weights()  # a scheme that starts elsewhere than the model's init

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None, kv_cache=None, last_only=False, reduction="mean", pos=None):
        """idx (B, T). Without targets: logits (B, T, vocab), or (B, 1, vocab) with last_only, and loss None.
        With targets: logits None and the loss (mean over targets != -1, or (B, T) with reduction="none"),
        computed in chunks so the full fp32 logits never exist. pos: position ids (T,) or (B, T) instead of
        0..T-1, increasing along T and below block_size (PoSE's skip-wise training, posenc/pose.py); no KV cache."""
        B, T = idx.size()
        scheme = self.transformer.pos
        start = kv_cache.pos if kv_cache is not None else 0
        end = start + T
        if pos is not None and kv_cache is not None:
            raise ValueError("position ids (pos) and a KV cache do not go together: the cache counts positions")
        if pos is not None:
            end = self.config.block_size  # the tables cover every id below block_size
        scheme.check_length(end)  # learned positions refuse past their table, in one line
        if kv_cache is not None:
            if end > kv_cache.max_len:
                raise ValueError(f"KV cache holds {kv_cache.max_len} positions; {end} are needed: make a larger cache")
            kv_cache.tokens[:, start:end] = idx
            key = scheme.cache_key(end)
            if key != kv_cache.key:  # positions changed meaning (dynamic NTK): recompute the whole cache
                idx, start, kv_cache.pos, kv_cache.key = kv_cache.tokens[:, :end], 0, 0, key
        scheme.prepare(end, idx.device)  # tables built once here, sliced by every layer
        k_pos = torch.arange(end, device=idx.device) if pos is None else pos
        q_pos = k_pos[start:] if pos is None else pos
        x = self.transformer.wte(idx)  # (B, T, C)
        pe = scheme.embed(q_pos)
        if pe is not None:
            x = x + pe.to(x.dtype)
        x = self.transformer.drop(x)
        for layer, block in enumerate(self.transformer.h):
            if self.config.activation_checkpointing and self.training and kv_cache is None:
                x = checkpoint(block, x, scheme, q_pos, k_pos, None, layer, use_reentrant=False)
            else:
                x = block(x, scheme, q_pos, k_pos, kv_cache, layer)
        x = self.transformer.ln_f(x[:, -T:])  # (B, T, C): only the positions asked for
        if kv_cache is not None:
            kv_cache.pos = end
        if targets is None:
            return self.lm_head(x[:, -1:] if last_only else x).float(), None
        return None, chunked_cross_entropy(x, self.lm_head.weight, targets, reduction)

    @torch.no_grad()
    def decode_step(self, tok, pos, kv_cache, head=None):
        """fp32 logits (B, vocab) of one new token per sequence, tok (B, 1), at position pos (a (1,) long tensor)
        through a filled kv_cache: the same as forward(tok, kv_cache=kv_cache) (tests/test_kv_cache.py), but every
        shape is the same at every step: attention reads the cache's max_len slots with the ones past pos masked,
        and the token is written at pos in place. So torch.compile compiles it once (static shapes, as gpt-fast's
        decoding), with no per-token Python left. The caller checks the length, keeps kv_cache.pos and builds the
        tables up front (posenc/generation.py); a scheme whose positions change meaning with the length, or that
        attends itself, takes forward instead (generation.why_not_static). head: lm_head's weight as (C, vocab),
        contiguous, when the caller has it (generation.decoding_head)."""
        scheme = self.transformer.pos
        k_pos = torch.arange(kv_cache.max_len, device=tok.device)
        kv_cache.tokens.index_copy_(1, pos, tok)
        x = self.transformer.wte(tok)  # (B, 1, C)
        pe = scheme.embed(pos)
        if pe is not None:
            x = x + pe.to(x.dtype)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, scheme, pos, k_pos, kv_cache, layer, static=True)
        x = self.transformer.ln_f(x)
        return (self.lm_head(x) if head is None else x @ head)[:, -1].float()

    def make_kv_cache(self, batch_size, max_len, dtype=None):
        """A cache for batch_size sequences of up to max_len tokens, in `dtype` or else the keys' own (autocast's)."""
        c = self.config
        return KVCache(c.n_layer, batch_size, c.n_head, max_len, c.n_embd // c.n_head, self.lm_head.weight.device, dtype)

    def num_params(self, non_embedding=True):
        """Parameters; non_embedding leaves out position tables (token embeddings count: they are the head)."""
        positions = sum(p.numel() for p in self.transformer.pos.parameters()) if non_embedding else 0
        return sum(p.numel() for p in self.parameters()) - positions

    def flops_per_token(self, T):
        """Training FLOPs per token, causal-aware: 6N + 6*L*C*T (N: matmul parameters, tied head once)."""
        N = sum(p.numel() for n, p in self.named_parameters() if p.dim() >= 2 and ".pos." not in n)
        return 6 * N + 6 * self.config.n_layer * self.config.n_embd * T

    def estimate_mfu(self, tokens_per_sec, T, peak_flops=H100_BF16_PEAK_FLOPS):
        return tokens_per_sec * self.flops_per_token(T) / peak_flops

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW; decay the matmuls and the token embedding (tensors with >= 2 dims), not biases, norms or the
        position scheme's tables.

        Position tables (T5's bias, learned positions) are not decayed, although they are 2-d: decay pulls them toward
        zero, toward a model without positions, and that model is a row of its own here (none). Measured on
        configs/cpu.toml (150 steps, val loss decayed -> not; issue 34): T5 3.369 -> 3.367 (seed 1337) and 3.233 ->
        3.180 (seed 1338), learned 3.529 -> 3.553 (seed 1337): differences well inside the spread between two seeds
        (0.14 for T5), so the loss did not decide; what decay does to a table did."""
        params = [p for p in self.parameters() if p.requires_grad]
        positions = {id(p) for p in self.transformer.pos.parameters()}
        decay = [p.dim() >= 2 and id(p) not in positions for p in params]
        groups = [{"params": [p for p, d in zip(params, decay) if d], "weight_decay": weight_decay},
                  {"params": [p for p, d in zip(params, decay) if not d], "weight_decay": 0.0}]
        fused = device_type == "cuda"  # the fused kernel: one launch for all parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)


def device_memory(device):
    """Bytes of memory on `device`: the GPU's own, or the machine's RAM for a CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): assume a small machine
        return 8 * 2 ** 30


def chunked_cross_entropy(x, weight, targets, reduction="mean", chunk=None):
    """Cross-entropy of x @ weight.T against targets, `chunk` tokens at a time (default: LOSS_CHUNK_LOGITS logits),
    so the full fp32 logits never exist at once in the forward. With gradients, each chunk keeps its fp32 log-probabilities for backward (4 bytes
    per logit) unless all of them together would pass LOSS_MEMORY_FRACTION of the device's memory: then each chunk
    is checkpointed (its logits recomputed in backward, one chunk alive at a time: 32k context fits), at the cost
    of the head's matmul once more (~16% of the GPU preset's training FLOPs)."""
    C = x.size(-1)
    xs, ts = x.reshape(-1, C), targets.reshape(-1)
    chunk = chunk or max(1, LOSS_CHUNK_LOGITS // weight.size(0))

    def chunk_loss(xc, tc):
        return F.cross_entropy(F.linear(xc, weight).float(), tc, ignore_index=-1, reduction="none")

    kept = xs.size(0) * weight.size(0) * 4  # bytes of fp32 log-probabilities kept for backward
    recompute = (xs.size(0) > chunk and torch.is_grad_enabled()
                 and kept > LOSS_MEMORY_FRACTION * device_memory(x.device))
    losses = [checkpoint(chunk_loss, xs[i:i + chunk], ts[i:i + chunk], use_reentrant=False) if recompute
              else chunk_loss(xs[i:i + chunk], ts[i:i + chunk]) for i in range(0, xs.size(0), chunk)]
    per_token = torch.cat(losses).view(targets.shape)  # (B, T); 0 where target == -1
    return per_token if reduction == "none" else per_token.sum() / (targets != -1).sum().clamp(min=1)
