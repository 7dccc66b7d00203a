"""Extend a RoPE model's context: scale its frequencies, then optionally fine-tune briefly at the new length.

    python extend_context.py --ckpt=out/cpu_rope/ckpt.pt --method=linear --factor=4 --steps=50
    python extend_context.py --ckpt=out/gpt2_rope/ckpt.pt --method=yarn --target_len=32768 --steps=400 \
        --batch_tokens=65536 --activation_checkpointing=true
    python extend_context.py --ckpt=out/gpt2_rope/ckpt.pt --method=dynamic --factor=8 --steps=0   # training-free

Methods (positions.rope_frequencies): linear = Position Interpolation (Chen et al. 2023), ntk = NTK-aware base,
dynamic = dynamic NTK, yarn (Peng et al. 2023), llama3. Fine-tuning is train.main with init_from=<ckpt>: the same
loop, logging, checkpoints, resume (--resume=true) and errors. Defaults follow the PI and YaRN recipes: lr 2e-5,
no weight decay, a short warmup, then cosine. Any train or model key can be given as --key=value.
--factor and --target_len count from the original training length (a model extended before keeps its original).
The output checkpoint is a train.py checkpoint whose config holds rope_scaling (method, factor, original length);
its "extension" record names the base checkpoint and its step.
"""
import dataclasses
import difflib
import json
import math
import os
import sys
from pathlib import Path

import torch

import train
from config import ConfigError, config_from_dict, config_to_dict, load_config
from data.loader import load_meta
from model import GPT
from positions import ROPE_TYPES, check_scaling

RECIPE = dict(learning_rate=2e-5, min_lr=2e-6, weight_decay=0.0)  # PI and YaRN fine-tune with lr 2e-5, no decay
MAX_WARMUP = 20  # warmup steps in both recipes (fewer for very short runs: a fifth of the steps)
MIN_LONG_DOCS = 4  # fewer long training documents than this: windows over concatenated documents instead
EXTEND_KEYS = {"ckpt": str, "method": str, "factor": float, "target_len": int, "steps": int, "batch_tokens": int,
               "scaling_params": json.loads}


def check_extendable(model_cfg, method, path):
    """Raise one clear line when this checkpoint's position scheme cannot take this method."""
    scheme = model_cfg.pos_encoding
    if scheme == "learned":
        raise ValueError(f"cannot extend {path}: learned positions cannot be scaled (its table has "
                         f"{model_cfg.block_size} rows and no more were trained); train a rope model to extend")
    if scheme == "alibi":
        raise ValueError(f"cannot extend {path}: ALiBi needs no scaling (its bias depends only on distance, so it "
                         "runs at any length as it is); evaluate it at the target length directly")
    if scheme == "none":
        raise ValueError(f"cannot extend {path}: it has no position encoding (NoPE), so there is nothing to scale")
    if method not in ROPE_TYPES:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(ROPE_TYPES)}")
    if scheme == "sinusoidal" and method != "linear":
        raise ValueError(f"cannot extend {path} with {method!r}: sinusoidal positions can only be interpolated "
                         "(--method=linear)")


def rope_scaling_for(model_cfg, method, factor=None, target_len=None, params=None):
    """The rope_scaling dict for extending this model, and the target length. Both count from the original
    training length: a model that was extended before keeps its original_max_position_embeddings."""
    base_len = int((model_cfg.rope_scaling or {}).get("original_max_position_embeddings") or model_cfg.block_size)
    if (factor is None) == (target_len is None):
        raise ValueError("give exactly one of --factor or --target_len")
    factor = float(factor) if factor is not None else target_len / base_len
    target_len = int(target_len) if target_len is not None else round(base_len * factor)
    if factor < 1:
        raise ValueError(f"target length {target_len} is shorter than the training length {base_len}: "
                         "extension needs factor >= 1")
    scaling = {"rope_type": method, "factor": factor, "original_max_position_embeddings": base_len, **(params or {})}
    return check_scaling(scaling), target_len


def count_long_docs(data_dir, min_len):
    """(documents of the train split with >= min_len tokens, all documents), from meta.json."""
    docs = load_meta(data_dir)["docs"]["train"]
    return sum(length >= min_len for _, length, _ in docs), len(docs)


def _as_flags(overrides):
    """Python values as --key=value strings, so they go through config.load_config's parsing and checks."""
    def text(v):
        return v if isinstance(v, str) else json.dumps(v) if isinstance(v, (dict, list, bool)) or v is None else str(v)
    return [f"--{k}={text(v)}" for k, v in overrides.items()]


def extend(base_ckpt, method, factor=None, target_len=None, steps=0, batch_tokens=None, out_dir=None,
           scaling_params=None, **overrides) -> str:
    """Scale a checkpoint's RoPE to a longer context and fine-tune it for `steps` (0: training-free).
    batch_tokens: tokens per optimizer step (default: the base run's), reached by gradient accumulation.
    overrides: any TrainConfig or GPTConfig key. Returns the path of the new checkpoint."""
    for key in ("block_size", "rope_scaling"):
        if key in overrides:
            raise ConfigError(f"extend_context.py sets {key} itself: give --method, --factor or --target_len instead")
    master = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 reports and writes
    log = print if master else (lambda *a, **k: None)
    ckpt = train.load_checkpoint(base_ckpt)
    base = config_from_dict(ckpt["config"])
    check_extendable(base.model, method, base_ckpt)
    scaling, target_len = rope_scaling_for(base.model, method, factor, target_len, scaling_params)
    factor, base_len = scaling["factor"], scaling["original_max_position_embeddings"]
    out_dir = out_dir or f"{Path(base_ckpt).parent}_{method}_x{factor:g}"
    world = int(os.environ.get("WORLD_SIZE", "1"))

    # batch: at most the base run's tokens per micro-step (so it fits where the base did), then accumulate
    base_tokens = base.batch_size * base.grad_accum_steps * base.model.block_size * world
    seqs = max(1, (batch_tokens or base_tokens) // (target_len * world))  # sequences per step per process
    micro = int(overrides.get("batch_size") or min(seqs, max(1, base.batch_size * base.model.block_size // target_len)))
    start = dataclasses.replace(
        base, **RECIPE, out_dir=out_dir, run_name="", resume=False, init_from=str(base_ckpt), max_iters=steps,
        lr_decay_iters=None, warmup_iters=min(MAX_WARMUP, steps // 5), min_doc_len=target_len + 1, device="auto",
        dtype="auto", batch_size=micro, grad_accum_steps=math.ceil(seqs / micro),
        model=dataclasses.replace(base.model, block_size=target_len, rope_scaling=scaling))
    cfg = load_config(_as_flags(overrides), defaults_cls=lambda: start)
    log(f"extending {base_ckpt} (step {ckpt.get('step')}): {method} x{factor:g}, {base_len} -> {target_len} "
        f"tokens, {steps} fine-tuning steps of {cfg.batch_size * cfg.grad_accum_steps * target_len * world:,} tokens")

    record = {"base_ckpt": str(Path(base_ckpt).resolve()), "base_step": ckpt.get("step"), "method": method,
              "factor": factor, "original_len": base_len, "target_len": target_len, "steps": steps}
    if steps > 0:
        if method == "dynamic":
            log("note: dynamic NTK is meant to be training-free; fine-tuning trains at the target length's "
                "frequencies, which shorter inputs will not use")
        if "min_doc_len" not in overrides:
            n_long, n_docs = count_long_docs(cfg.data_dir, target_len + 1)
            log(f"{cfg.data_dir}: {n_long} of {n_docs} training documents have >= {target_len + 1} tokens")
            if n_long < MIN_LONG_DOCS:
                log(f"too few long documents (< {MIN_LONG_DOCS}): fine-tuning on windows over concatenated documents")
                cfg = dataclasses.replace(cfg, min_doc_len=0)
            record["n_long_docs"] = n_long
        record["min_doc_len"] = cfg.min_doc_len
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    if master:
        (Path(out_dir) / "extension.json").write_text(json.dumps(record, indent=2) + "\n")

    if steps == 0:  # training-free: the base weights under the new config, in train.py's checkpoint format
        with torch.device("meta"):
            GPT(cfg.model)  # a bad config fails here, as it would at load time
        new = {"model": ckpt["model"], "optimizer": None, "step": 0, "iter_num": 0, "config": config_to_dict(cfg),
               "data": ckpt.get("data"), "best_val_loss": float("inf"), "format_version": train.FORMAT_VERSION}
        path = Path(out_dir) / "ckpt.pt"
    else:
        del ckpt  # train.main loads the weights itself (init_from)
        result = train.main(cfg)
        if not master:
            return result["ckpt"]
        if result["ckpt"] is None:
            raise train.TrainingError(f"fine-tuning stopped before its first checkpoint; nothing written to {out_dir}")
        path, record["steps"] = result["ckpt"], result["step"]
        new = train.load_checkpoint(path)
    new["extension"] = record
    path = train.save_checkpoint(new, path)
    log(f"wrote {path}: rope_scaling={json.dumps(scaling)}, block_size={target_len}")
    return path


def parse_args(argv):
    """Extension keys by name; every other --key=value goes to the train/model config (checked there)."""
    kwargs = {}
    for arg in argv:
        if not arg.startswith("--"):
            raise ConfigError(f"extend_context.py takes only --key=value flags, got {arg!r}")
        key, eq, value = arg[2:].partition("=")
        key, value = key.replace("-", "_"), value if eq else "true"
        if key in EXTEND_KEYS:
            try:
                kwargs[key] = EXTEND_KEYS[key](value)
            except ValueError:
                raise ConfigError(f"bad value {value!r} for config key '{key}'") from None
        else:
            close = difflib.get_close_matches(key, EXTEND_KEYS, n=1, cutoff=0.8)
            if close:
                raise ConfigError(f"unknown config key '{key}' (did you mean '{close[0]}'?)")
            kwargs[key] = value
    for key in ("ckpt", "method"):
        if key not in kwargs:
            raise ConfigError(f"missing --{key}: e.g. --ckpt=out/cpu_rope/ckpt.pt --method=linear --factor=4")
    kwargs["base_ckpt"] = kwargs.pop("ckpt")
    return kwargs


def main(argv=None):
    try:
        extend(**parse_args(sys.argv[1:] if argv is None else argv))
    except (ValueError, FileNotFoundError, train.TrainingError) as e:  # ConfigError, CheckpointError: ValueErrors
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
