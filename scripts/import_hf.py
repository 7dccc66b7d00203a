"""Import a local transformers GPT-NeoX or GPT-2 folder as a train.py checkpoint, exactly (rope or learned).

    python -m scripts.import_hf --hf_dir=hf/cpu_rope --out_dir=out/cpu_rope_hf
    python extend_context.py --ckpt=out/cpu_rope_hf/ckpt.pt --method=yarn --factor=4 --steps=0

What our GPT cannot compute exactly is refused in one line: a parallel residual (Pythia, GPT-NeoX-20B), any
activation but GELU (exact, or the tanh approximation of GPT-2's own checkpoints: our activation="gelu_tanh"),
untied embeddings, other widths or epsilons, RoPE types we do not have. A folder written by scripts/export_hf.py carries
our config ("posenc" in config.json); it is used when it describes the same transformers model, so export ->
import gives back config and weights bit for bit (the interleaved RoPE layout and an original length included).
The import is refused unless our model gives the transformers model's logits.
"""
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from model import GPT, GPTConfig
from posenc.checkpoint import FORMAT_VERSION, load_weights, model_config, save_checkpoint
from posenc.cli import cli
from posenc.config import ConfigError, check_fields, parse, to_dict
from posenc.hf_mapping import (FROM_HF_ACTIVATION, ROPE_KEYS, check_parity, convert_weight, hf_config, key_pairs,
                               parity_lengths, require_transformers)
from posenc.positions import permute_rope_layout
from posenc.rope_scaling import ROPE_SCALING
from posenc.run_folder import claim, clear
from posenc.tokenizer import find_tokenizer_dir
from train import TrainConfig


@dataclass
class ImportConfig:
    hf_dir: str = ""  # a folder that AutoModelForCausalLM.from_pretrained loads (required)
    out_dir: str = ""  # where to write ckpt.pt (required)
    overwrite: bool = False  # replace an earlier run in out_dir

    def __post_init__(self):
        check_fields(self)


IGNORED = {"posenc", "_name_or_path", "architectures", "dtype", "torch_dtype", "transformers_version"}


def rope_settings(c):
    """(theta, rotary fraction, rope parameters) from a GPT-NeoX config of transformers 5.x or 4.x."""
    params = dict(getattr(c, "rope_parameters", None) or {})
    if not params:  # 4.x: rotary_pct, rotary_emb_base, rope_scaling
        params = {**(c.rope_scaling or {}), "rope_theta": c.rotary_emb_base, "partial_rotary_factor": c.rotary_pct}
    return float(params["rope_theta"]), float(params.get("partial_rotary_factor", 1.0)), params


def our_scaling(params, max_len):
    """transformers' rope parameters as our rope_scaling dict (None for the default type)."""
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return None
    if kind not in ROPE_KEYS:
        raise ValueError(f"rope_type {kind!r} has no posenc equivalent (we have {', '.join(ROPE_KEYS)})")
    unknown = set(params) - {"rope_type", "type", "rope_theta", "partial_rotary_factor", *ROPE_KEYS[kind]}
    if unknown:
        raise ValueError(f"rope_type {kind!r} with {', '.join(sorted(unknown))} has no posenc equivalent")
    scaling = {"rope_type": kind, **{k: params[k] for k in ROPE_KEYS[kind] if params.get(k) is not None}}
    m = ROPE_SCALING[kind]  # dynamic reads L from max_position_embeddings, as in posenc/hf_mapping.py
    if ("original_max_position_embeddings" not in ROPE_KEYS[kind] and m.length_dependent) or \
            ("original_max_position_embeddings" not in scaling and m.needs_original_len):
        scaling["original_max_position_embeddings"] = max_len  # transformers' fallback (dynamic: always)
    if "factor" not in scaling and kind in ("longrope", "proportional"):  # transformers' defaults for these two
        scaling["factor"] = max_len / scaling["original_max_position_embeddings"] if kind == "longrope" else 1.0
    return scaling


def derived_config(c, bias):
    """Our GPTConfig from a transformers config alone; ValueError naming what we cannot compute exactly."""
    if c.model_type == "gpt_neox":
        C, act, inner, eps = c.hidden_size, c.hidden_act, c.intermediate_size, c.layer_norm_eps
        if c.use_parallel_residual:
            raise ValueError("it uses a parallel residual (attention and MLP both read the block input, as Pythia "
                             "does); our block is sequential")
    elif c.model_type == "gpt2":
        C, act, inner, eps = c.n_embd, c.activation_function, c.n_inner or 4 * c.n_embd, c.layer_norm_epsilon
        if not c.scale_attn_weights or c.scale_attn_by_inverse_layer_idx or c.add_cross_attention:
            raise ValueError("its attention scaling or cross-attention differs from GPT-2's standard block")
    else:
        raise ValueError(f"model_type {c.model_type!r}: only gpt_neox (rope) and gpt2 (learned) map onto posenc")
    if act not in FROM_HF_ACTIVATION:
        raise ValueError(f"its activation is {act!r}; ours is GELU, exact or tanh-approximate "
                         f"({', '.join(map(repr, FROM_HF_ACTIVATION))})")
    activation = FROM_HF_ACTIVATION[act]
    if inner != 4 * C or eps != 1e-5:
        raise ValueError(f"its MLP width {inner} or LayerNorm eps {eps} differ from ours (4 x {C}, 1e-05)")
    if c.model_type == "gpt2":
        return GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head,
                         n_embd=C, bias=bias, pos_encoding="learned", activation=activation)
    theta, fraction, params = rope_settings(c)
    scaling = our_scaling(params, c.max_position_embeddings)
    if scaling and ROPE_SCALING[scaling["rope_type"]].whole_head:  # p-RoPE: the fraction is its own, in scaling
        fraction = 1.0
    return GPTConfig(block_size=c.max_position_embeddings, vocab_size=c.vocab_size, n_layer=c.num_hidden_layers,
                     n_head=c.num_attention_heads, n_embd=C, bias=bias, pos_encoding="rope", rope_theta=theta,
                     rotary_fraction=fraction, rope_scaling=scaling, activation=activation)


def recorded_config(c, derived, transformers, path):
    """The GPTConfig scripts/export_hf.py recorded, if it describes this same transformers model; else None."""
    record = getattr(c, "posenc", None)
    if not isinstance(record, dict) or "model" not in record:
        return None
    config = model_config({"config": {"model": record["model"]}}, path)
    fresh, loaded = hf_config(config, transformers).to_dict(), c.to_dict()
    if any(loaded.get(k) != v for k, v in fresh.items() if k not in IGNORED) or (derived.bias and not config.bias):
        print(f"note: {path}'s posenc record does not match its transformers config; using the latter", file=sys.stderr)
        return None
    return config


def from_hf(hf, path="the model"):
    """(our GPT in eval mode, posenc record or {}) holding a transformers GPT-NeoX / GPT-2 model's weights."""
    transformers = require_transformers()
    c = hf.config  # (transformers 4.x names GPT-NeoX's head embed_out)
    theirs = {k.replace("embed_out.", "lm_head."): v.float() for k, v in hf.state_dict().items()}
    if not c.tie_word_embeddings and "lm_head.weight" in theirs:
        embed = theirs["gpt_neox.embed_in.weight" if c.model_type == "gpt_neox" else "transformer.wte.weight"]
        if not torch.equal(embed, theirs["lm_head.weight"]):
            raise ValueError(f"cannot import {path}: its output head is not tied to its token embeddings (ours is)")
    bias = any(v.any() for k, v in theirs.items() if k.endswith(".bias"))  # bias=False: every bias is zero
    try:
        derived = derived_config(c, bias)
    except ValueError as e:
        raise ValueError(f"cannot import {path}: {e}") from None
    config = recorded_config(c, derived, transformers, path) or derived
    state = {}
    for ours, hf_key, kind in key_pairs(config):
        if hf_key in theirs:
            state[ours] = convert_weight(theirs[hf_key], kind, config, to_hf=False)
        elif ours.endswith(".bias") and config.bias:  # GPT-NeoX without attention biases: ours are zero
            state[ours] = torch.zeros(theirs[hf_key.removesuffix(".bias") + ".weight"].shape[0])
    state = {k: v for k, v in state.items() if config.bias or not k.endswith(".bias")}  # bias=False: drop the zeros
    if config.rope_layout != "half":
        state = permute_rope_layout(state, config, config.rope_layout)  # transformers' half pairing -> ours
    model = load_weights(GPT(config), state, path).eval()
    hf = hf.float().eval()
    for T in parity_lengths(model):
        check_parity(model, hf, T, what="import")
    return model, getattr(c, "posenc", None) or {}


def check_tokenizer(hf_dir):
    """posenc's data and sampling use GPT-2's ids: refuse a folder whose vocabulary is another."""
    gpt2 = find_tokenizer_dir()
    vocab = Path(hf_dir) / "vocab.json"
    if gpt2 is None or not vocab.is_file():
        print(f"note: no vocab.json in {hf_dir} to check; posenc assumes GPT-2's token ids", file=sys.stderr)
    elif json.loads(vocab.read_text()) != json.loads((gpt2 / "encoder.json").read_text()):
        raise ValueError(f"cannot import {hf_dir}: its vocab.json is not GPT-2's (posenc tokenizes with GPT-2's BPE)")


def import_hf(hf_dir, out_dir, overwrite=False):
    """Write <out_dir>/ckpt.pt (train.py's format: extend_context.py and train.py --init_from read it)."""
    transformers = require_transformers()
    transformers.utils.logging.disable_progress_bar()
    if not (Path(hf_dir) / "config.json").is_file():
        raise FileNotFoundError(f"no transformers model at {hf_dir} (no config.json)")
    check_tokenizer(hf_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True)
    model, record = from_hf(hf, hf_dir)
    data = record.get("data") or {"tokenizer": "gpt2", "vocab": None}  # GPT-2's ids: check_tokenizer saw to that
    ckpt = {"model": model.state_dict(), "optimizer": None, "step": record.get("step") or 0,
            "config": to_dict(TrainConfig(model=model.config)), "data": data,
            "best_val_loss": float("inf"), "format_version": FORMAT_VERSION, "hf_source": str(Path(hf_dir).resolve())}
    with claim(out_dir, resume=False, overwrite=overwrite, what="run"):
        clear(out_dir)
        return save_checkpoint(ckpt, Path(out_dir) / "ckpt.pt")


def main(argv=None):
    cfg = parse(ImportConfig, argv, doc=__doc__)
    if not (cfg.hf_dir and cfg.out_dir):
        raise ConfigError("give --hf_dir and --out_dir: e.g. --hf_dir=hf/cpu_rope --out_dir=out/cpu_rope_hf")
    path = import_hf(cfg.hf_dir, cfg.out_dir, cfg.overwrite)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    cli(main, errors=(ValueError, OSError, ImportError))
