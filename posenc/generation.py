"""Generation: a prompt prefilled in one forward, then one token at a time through the model's preallocated KV
cache; greedy, temperature, top-k and top-p sampling. sample.py is its command line; the passkey and recall
tasks call generate() too."""
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

# Every decode step has a new key length, and cuDNN attention (SDPA's first choice on H100) builds a new
# plan per shape: ~12 ms of CPU per call. The flash and memory-efficient kernels have no such cost.
DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]



def filter_logits(logits, top_k=None, top_p=None):
    """Set to -inf every logit outside the top_k and outside the smallest set whose probability >= top_p."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p  # mass before this token already reaches top_p
        logits = logits.masked_fill(outside.scatter(-1, order, outside), float("-inf"))
    return logits


def next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token per row of logits (B, V); temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)  # (B, 1)


def why_not_static(model):
    """Why model.decode_step (static shapes, compiled once) cannot decode this model, or None when it can."""
    scheme = model.transformer.pos
    if scheme.cache_key(1) is not None:
        return "its positions change meaning with the length (dynamic NTK, LongRoPE): the cache is recomputed"
    if getattr(scheme, "self_extend", None) is not None:
        return "Self-Extend attends with its own kernel"
    if scheme.attends_itself:
        return f"{model.config.pos_encoding} forms its attention itself, from the scores of every key"
    return None


def decode_step_of(model, compile=False):
    """model.decode_step, or its compiled form: made once per model (static shapes, so one compilation per cache
    length and batch). fullgraph is not demanded: a scheme whose bias breaks the graph still decodes, only slower."""
    if not compile:
        return model.decode_step
    if getattr(model, "_compiled_decode_step", None) is None:
        model._compiled_decode_step = torch.compile(model.decode_step, dynamic=False)
    return model._compiled_decode_step


def decoding_head(model):
    """The tied head's weight as (C, vocab), contiguous, for the decode step where it pays, else None. One token
    times the (vocab, C) weight is a matrix-vector product whose fp32 CPU kernel reads that layout slowly:
    measured alone on 2 cores (AMD EPYC, torch 2.13.0) at 50304 x 128, 2.73 ms through lm_head and 0.86 ms
    against the transposed copy, most of a token's time; in bf16 0.25 and 0.30 ms, so bf16 keeps lm_head. The copy
    costs the weight's size once per generation."""
    w = model.lm_head.weight
    if w.device.type != "cpu" or w.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        return None
    return w.detach().t().contiguous()


@torch.no_grad()
@sdpa_kernel(DECODE_BACKENDS)
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True,
             generator=None, stop_token=None, on_token=None, compile=False, static=True):
    """Continue idx (B, T) by up to max_new_tokens; returns (B, T + new) with the prompt in front.

    The prompt is prefilled in one forward; each new token then takes model.decode_step, whose shapes never
    change (compile=True compiles it once), unless why_not_static says otherwise or static=False (then forward with
    the cache: the reference the static step is checked against, scripts/check_decoding.py).
    use_cache=False recomputes the whole context at every step (the reference path, and the baseline of
    scripts/bench_decode.py). on_token(tok (B, 1)) is called as each token is chosen. Generation stops early
    once every row has produced stop_token.
    """
    B, T = idx.shape
    if T == 0:
        raise ValueError("empty prompt: give at least one token")
    total = T + max_new_tokens
    try:  # the scheme says up front if it cannot run this many positions (learned: its table)
        model.transformer.pos.check_length(total)
    except ValueError as e:
        raise ValueError(f"prompt of {T} tokens + {max_new_tokens} new tokens: {e}") from None
    cache = model.make_kv_cache(B, total) if use_cache else None
    logits = model(idx, kv_cache=cache, last_only=True)[0][:, -1]  # prefill: one forward over the prompt
    step_fn = decode_step_of(model, compile) if static and use_cache and why_not_static(model) is None else None
    if step_fn is not None:
        model.transformer.pos.prepare(total, idx.device)  # every table the steps will read, built before them
        pos = torch.tensor([T], device=idx.device)  # the next token's position, counted on the device
        head = decoding_head(model)
    done = torch.zeros(B, dtype=torch.bool, device=idx.device)
    for step in range(max_new_tokens):
        tok = next_token(logits, temperature, top_k, top_p, generator)
        idx = torch.cat((idx, tok), dim=1)
        if on_token is not None:
            on_token(tok)
        if stop_token is not None:
            done |= tok[:, 0] == stop_token
            if done.all():
                break
        if step + 1 < max_new_tokens and step_fn is not None:  # no forward for a token that will not be used
            logits = step_fn(tok, pos, cache, head)
            pos += 1
            cache.pos += 1
        elif step + 1 < max_new_tokens:
            logits = model(tok if use_cache else idx, kv_cache=cache, last_only=True)[0][:, -1]
    return idx


def to_inference_dtype(model, dtype):
    """Cast weights to dtype but keep the position scheme in fp32: RoPE cos/sin in bf16 are a known
    long-context precision bug, and Module.to() casts buffers too."""
    model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype).transformer.pos.float()
    return model.eval()
