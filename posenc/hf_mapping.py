"""The mapping between our GPT and transformers' GPT-NeoX (rope) and GPT-2 (learned), shared by scripts/export_hf.py
and scripts/import_hf.py: configs (RoPE scaling as rope_parameters, and as transformers 4.x's keys), state dict keys and
the two weight transforms (GPT-NeoX's per-head fused QKV rows, GPT-2's transposed Conv1D), and the logit check.
transformers is optional: it is imported inside require_transformers only.
"""
from dataclasses import dataclass

import torch

from posenc.positions import RoPE
from posenc.rope_scaling import ROPE_SCALING, inverse_frequencies, length_dependent, longrope_factors, rope_frequencies

GPT2_VOCAB, EOT = 50257, 50256
# GPTConfig.activation -> transformers' name (hidden_act, activation_function); "gelu_new" is GPT-2's own tanh GELU
HF_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_new"}
# what scripts/import_hf.py reads as ours: the same two functions under every name transformers gives them (gelu_fast is
# the tanh formula with sqrt(2/pi) rounded to 10 digits)
FROM_HF_ACTIVATION = {**{v: k for k, v in HF_ACTIVATION.items()}, "gelu_pytorch_tanh": "gelu_tanh",
                      "gelu_fast": "gelu_tanh"}
# transformers' rope_parameters keys of the rope_types it shares with us (same names, same formulas)
ROPE_KEYS = {"linear": ("factor",), "dynamic": ("factor",),
             "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor",
                      "truncate"),
             "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
             "longrope": ("factor", "original_max_position_embeddings", "short_factor", "long_factor",
                          "attention_factor"),
             "proportional": ("factor", "partial_rotary_factor")}  # p-RoPE's fraction replaces partial rotary's


@dataclass(frozen=True)
class Architecture:
    """A transformers architecture that computes one of our schemes exactly, and how our names map onto it."""
    model_class: str
    model_type: str
    prefix: str  # of the embeddings and the final norm
    layers: str  # of block i
    block: dict  # our block module -> theirs
    qkv: str | None  # the fused-QKV transform: "qkv" (GPT-NeoX: per head [q_h, k_h, v_h]) or "T" (GPT-2's Conv1D)
    embed: str
    final_norm: str
    position_table: str | None  # the learned position table, if any


NEOX = Architecture("GPTNeoXForCausalLM", "gpt_neox", "gpt_neox.", "gpt_neox.layers.",
                    {"ln_1": "input_layernorm", "attn.c_attn": "attention.query_key_value",
                     "attn.c_proj": "attention.dense", "ln_2": "post_attention_layernorm",
                     "mlp.c_fc": "mlp.dense_h_to_4h", "mlp.c_proj": "mlp.dense_4h_to_h"},
                    "qkv", "embed_in", "final_layer_norm", None)
GPT2 = Architecture("GPT2LMHeadModel", "gpt2", "transformer.", "transformer.h.",
                    {m: m for m in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")},
                    "T", "wte", "ln_f", "wpe")
ARCHITECTURES = {"rope": NEOX, "learned": GPT2}  # our scheme -> the architecture that computes it exactly
CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # GPT-2 stores these (in, out): transposed


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("transformers is not installed: pip install transformers safetensors "
                          "(optional; only scripts/export_hf.py and scripts/import_hf.py need it)") from None
    return transformers


def rope_parameters(config):
    """Our RoPE settings as transformers 5.x rope_parameters. A scaling whose frequencies are those of plain RoPE
    with another base (our 'ntk') is the default type with that base; a length-dependent one (dynamic) takes its
    original length from max_position_embeddings (see hf_config)."""
    s = config.rope_scaling or {}
    d = RoPE.rotated_dim(config)
    params = {"rope_type": "default", "rope_theta": float(config.rope_theta),
              "partial_rotary_factor": float(config.rotary_fraction)}
    if not s:
        return params
    inv_freq, attention_factor = rope_frequencies(d, config.rope_theta, s)
    base = float(inv_freq[1] ** (-d / 2))  # inv_freq[i] = base^(-2i/d) if it is a plain base change
    if s["rope_type"] not in ROPE_KEYS and attention_factor == 1.0 and not length_dependent(s) \
            and torch.allclose(inv_freq, inverse_frequencies(base, d), rtol=1e-12, atol=0):
        return params | {"rope_theta": base}
    kind = s["rope_type"]
    if kind not in ROPE_KEYS:
        raise ValueError(f"rope_type {kind!r} has no transformers equivalent (it has {', '.join(ROPE_KEYS)})")
    keys = ROPE_KEYS[kind]  # our defaults written out: transformers requires some of them (llama3's)
    defaults = {k: v for k, v in ROPE_SCALING[kind].options.items() if k in keys and v is not None}
    given = {k: s[k] for k in keys if s.get(k) is not None}
    if kind == "longrope":  # transformers requires both lists: our defaults written out
        given |= dict(zip(("short_factor", "long_factor"), longrope_factors(s, d)))
    return params | {"rope_type": kind} | defaults | given | {"factor": float(s["factor"])}


def legacy_rope(params):
    """The same settings as transformers 4.x's GPT-NeoX reads them (it ignores rope_parameters)."""
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
    return {"rotary_pct": params["partial_rotary_factor"], "rotary_emb_base": params["rope_theta"],
            "rope_scaling": scaling if scaling["rope_type"] != "default" else None}


def hf_architecture(config) -> Architecture:
    """The transformers architecture for this config's scheme; ValueError if none computes it exactly."""
    if config.pos_encoding not in ARCHITECTURES:
        raise ValueError(f"no transformers architecture computes {config.pos_encoding!r} positions exactly")
    return ARCHITECTURES[config.pos_encoding]


def hf_config(config, transformers):
    """The transformers config object for our GPTConfig."""
    common = dict(vocab_size=config.vocab_size, bos_token_id=EOT, eos_token_id=EOT, tie_word_embeddings=True)
    if hf_architecture(config) is GPT2:
        p = config.dropout
        return transformers.GPT2Config(n_embd=config.n_embd, n_layer=config.n_layer, n_head=config.n_head,
                                       n_positions=config.block_size,
                                       activation_function=HF_ACTIVATION[config.activation],
                                       layer_norm_epsilon=1e-5, resid_pdrop=p, embd_pdrop=p, attn_pdrop=p, **common)
    params = rope_parameters(config)
    rope = {"rope_parameters": params} if int(transformers.__version__.split(".")[0]) >= 5 else legacy_rope(params)
    # transformers' dynamic NTK reads its original length L from max_position_embeddings; every other type from
    # its params (LongRoPE too)
    max_len = (config.rope_scaling["original_max_position_embeddings"]
               if length_dependent(config.rope_scaling) and "original_max_position_embeddings" not in
               ROPE_KEYS[config.rope_scaling["rope_type"]] else config.block_size)
    return transformers.GPTNeoXConfig(
        hidden_size=config.n_embd, num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
        intermediate_size=4 * config.n_embd, hidden_act=HF_ACTIVATION[config.activation], layer_norm_eps=1e-5,
        use_parallel_residual=False, attention_bias=config.bias, max_position_embeddings=max_len,
        hidden_dropout=config.dropout, attention_dropout=config.dropout, **rope, **common)


def key_pairs(config):
    """(our state_dict key, transformers key, transform) for every weight and bias; transform is 'qkv' (per-head
    [q_h, k_h, v_h] rows in GPT-NeoX), 'T' (GPT-2's Conv1D) or None."""
    a = hf_architecture(config)
    pairs = [("transformer.wte.weight", f"{a.prefix}{a.embed}.weight", None), ("lm_head.weight", "lm_head.weight", None)]
    if a.position_table:
        pairs.append(("transformer.pos.wpe.weight", f"{a.prefix}{a.position_table}.weight", None))
    for i in range(config.n_layer):
        for ours, theirs in a.block.items():
            kind = a.qkv if ours == "attn.c_attn" or (a.qkv == "T" and ours in CONV1D) else None
            pairs.append((f"transformer.h.{i}.{ours}.weight", f"{a.layers}{i}.{theirs}.weight", kind))
            pairs.append((f"transformer.h.{i}.{ours}.bias", f"{a.layers}{i}.{theirs}.bias", kind if kind == "qkv" else None))
    return pairs + [(f"transformer.ln_f.{p}", f"{a.prefix}{a.final_norm}.{p}", None) for p in ("weight", "bias")]


def convert_weight(w, kind, config, to_hf):
    nh, hs = config.n_head, config.n_embd // config.n_head
    if kind == "T" and w.dim() == 2:
        return w.t().contiguous()
    if kind == "qkv":  # ours: [all q; all k; all v] rows; GPT-NeoX: per head [q_h; k_h; v_h]
        shape = (3, nh, hs) if to_hf else (nh, 3, hs)
        return w.reshape(*shape, *w.shape[1:]).transpose(0, 1).reshape(w.shape).contiguous()
    return w


def parity_lengths(model):
    """The lengths the logit check runs at: past the training length where the model can run, after the original
    length itself for a scaling that changes with the length (the other side of LongRoPE's switch). Growing:
    transformers' dynamic NTK keeps the frequencies of the longest input it has seen."""
    c, past = model.config, min(model.transformer.pos.max_len or 2 * model.config.block_size, 512)
    short = c.rope_scaling["original_max_position_embeddings"] if length_dependent(c.rope_scaling) else past
    return tuple(sorted({min(short, past), past}))


@torch.no_grad()
def check_parity(model, hf, T, what="export", tol=1e-3):
    """Refuse unless the transformers model gives our logits on a random sequence of length T (relative to the
    largest logit: fp32 kernels and rotation angles differ in the last bits)."""
    idx = torch.randint(0, min(GPT2_VOCAB, model.config.vocab_size), (1, T), generator=torch.Generator().manual_seed(0))
    ours, theirs = model(idx)[0].float(), hf(idx).logits.float()
    diff = (ours - theirs).abs().max().item()
    if not diff <= tol * max(1.0, ours.abs().max().item()):
        raise ValueError(f"{type(hf).__name__} logits differ from ours by {diff:.3g} at length {T}: no {what} "
                         "(please report this as a bug)")
    return diff
