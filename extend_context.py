r"""Extend a RoPE model's context: scale its frequencies, then optionally fine-tune briefly at the new length.

    python extend_context.py --ckpt=out/cpu_rope/ckpt.pt --method=linear --factor=4 --steps=50
    python extend_context.py --ckpt=out/gpt2_124m_rope/ckpt.pt --method=yarn --target_len=32768 --steps=400 \
        --batch_tokens=65536 --activation_checkpointing=true
    python extend_context.py --ckpt=out/gpt2_124m_rope/ckpt.pt --method=dynamic --factor=8 --steps=0   # training-free
    python extend_context.py --ckpt=out/cpu_rope/ckpt.pt --method=linear --factor=4 --steps=50 --pose=true  # PoSE
    python extend_context.py --ckpt=out/cpu_rope/ckpt.pt --method=drope --steps=100   # DroPE: drop RoPE, recalibrate
    python extend_context.py --ckpt=out/cpu_rope/ckpt.pt --method=longrope --factor=4 --search=true  # LongRoPE search

Methods are the rope_types of posenc/rope_scaling.py: linear = Position Interpolation (Chen et al. 2023), ntk =
NTK-aware base, dynamic = dynamic NTK, yarn (Peng et al. 2023), llama3, longrope (Ding et al. 2024; with
--search=true its long factors are searched first, see posenc/longrope_search.py), proportional (p-RoPE); direct = no
scaling (the control: RoPE fine-tuned at the target length as it is); abf = a new base (Xiong et al. 2023), --scaling_params='{"base": 5e5}'
or, without one, Xu et al.'s bound 0.0424 * target_len^1.628. And one that is not a scaling: drope (Gelberg et
al. 2025) removes the positions (the model goes on as NoPE) and recalibrates it at the original length.
--pose=true fine-tunes any scaling with PoSE (posenc/pose.py): windows of the original length whose position ids skip
up to the target (--pose_chunks chunks), so a step costs what a base-length step costs. Fine-tuning is train.main with
init_from=<ckpt>: the same loop, logging, checkpoints, resume (--resume=true) and errors. Defaults follow the PI
and YaRN recipes: lr 2e-5, no weight decay, a short warmup, then cosine. Any train or model key can be given
as --key=value. --factor and --target_len count from the original training length (a model extended before
keeps its original). The output is a train.py checkpoint whose config holds rope_scaling; its "extension"
record names the base checkpoint and its step.
"""
import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

import train
from model import GPT
from posenc.checkpoint import FORMAT_VERSION, load_checkpoint, rng_state, save_checkpoint
from posenc.cli import cli
from posenc.config import ConfigError, apply, at_least, check_fields, from_dict, parse, to_dict
from posenc.data import load_meta, n_long_documents
from posenc.rope_scaling import ROPE_SCALING, abf_base, length_dependent, original_length, scaling_dict
from posenc.run_folder import claim, clear, write_atomic

RECIPE = dict(learning_rate=2e-5, min_lr=2e-6, weight_decay=0.0)  # PI and YaRN fine-tune with lr 2e-5, no decay
MAX_WARMUP = 20  # warmup steps in both recipes (fewer for very short runs: a fifth of the steps)
MIN_LONG_DOCS = 4  # fewer long training documents than this: windows over concatenated documents instead
SET_BY_EXTENSION = ("block_size", "rope_scaling", "pose_window")
DROPE = "drope"  # the method that is not a rope_type: drop the positions, recalibrate without them


@dataclass
class ExtendConfig:
    ckpt: str = ""  # the base checkpoint (required)
    method: str = ""  # required: a rope_type (linear, ntk, dynamic, yarn, llama3, longrope, proportional, direct,
    #                   abf), or drope
    factor: float | None = None  # the context multiple, from the original training length ...
    target_len: int | None = None  # ... or the new length: give exactly one
    steps: int = 0  # fine-tuning steps; 0: training-free
    batch_tokens: int | None = None  # tokens per optimizer step (default: the base run's), by accumulation
    out_dir: str = ""  # "": <base run folder>_<method>_x<factor>
    scaling_params: dict | None = None  # more rope_scaling keys, e.g. {"beta_fast": 16}, or abf's {"base": 5e5}
    pose: bool = False  # PoSE: fine-tune on windows of the original length, position ids skip-wise to the target
    search: bool = False  # longrope: search its long factors first (posenc/longrope_search.py), from PI, NTK and YaRN's
    search_budget: int = 48  # candidates the search scores, its three starting points included
    search_docs: int = 4  # held-out val documents it scores them on, at the target length

    def __post_init__(self):
        check_fields(self)
        at_least(self, 1, "factor", "target_len", "batch_tokens", "search_docs")
        at_least(self, 3, "search_budget")
        at_least(self, 0, "steps")
        if self.method and self.method not in (*ROPE_SCALING, DROPE):
            raise ConfigError(f"bad value {self.method!r} for config key 'method': choose one of "
                              f"{', '.join((*ROPE_SCALING, DROPE))}")
        if self.pose and self.steps == 0:
            raise ConfigError("--pose is a way to fine-tune: give --steps > 0")
        if self.method == DROPE and (self.pose or self.factor or self.target_len or self.scaling_params):
            raise ConfigError("drope takes no --factor, --target_len, --scaling_params or --pose: it removes the "
                              "positions and recalibrates at the original length")
        if self.search and self.method != "longrope":
            raise ConfigError(f"--search=true searches LongRoPE's factors: give --method=longrope (not {self.method!r})")


def check_extendable(model_cfg, scaling, target_len, path):
    """The base model's config at the new length and scaling; one clear line if its scheme refuses it."""
    try:
        return dataclasses.replace(model_cfg, block_size=target_len, rope_scaling=scaling)
    except ValueError as e:  # the scheme's own reason (learned: no table past block_size; ALiBi: needs none)
        raise ValueError(f"cannot extend {path}: {e}") from None


def rope_scaling_for(model_cfg, method, factor=None, target_len=None, params=None):
    """The rope_scaling dict for extending this model, and the target length. Both count from the original
    training length: a model that was extended before keeps its original_max_position_embeddings."""
    base_len = original_length(model_cfg.rope_scaling, model_cfg.block_size)
    if (factor is None) == (target_len is None):
        raise ValueError("give exactly one of --factor or --target_len")
    factor = float(factor) if factor is not None else target_len / base_len
    target_len = int(target_len) if target_len is not None else round(base_len * factor)
    if factor < 1:
        raise ValueError(f"target length {target_len} is shorter than the training length {base_len}: "
                         "extension needs factor >= 1")
    params = dict(params or {})
    if method == "abf" and params.get("base") is None:  # written out, so the checkpoint says which base it has
        params["base"] = abf_base(target_len)
        if params["base"] <= model_cfg.rope_theta:
            raise ValueError(f"Xu et al.'s bound for {target_len} tokens (base >= 0.0424 * {target_len}^1.628 = "
                             f"{params['base']:.0f}) is below this model's base {model_cfg.rope_theta:g}: ABF would "
                             "not raise it; give one with --scaling_params='{\"base\": 500000}'")
    return scaling_dict(method, factor, base_len, **params), target_len


def drope_config(model_cfg, path):
    """DroPE: the same model with no position scheme (NoPE), at its original training length."""
    if model_cfg.pos_encoding != "rope":
        raise ValueError(f"cannot apply DroPE to {path}: it drops RoPE, and this model has "
                         f"{model_cfg.pos_encoding!r} positions")
    base_len = original_length(model_cfg.rope_scaling, model_cfg.block_size)
    return dataclasses.replace(model_cfg, pos_encoding="none", rope_scaling=None, block_size=base_len)


def extend(ext: ExtendConfig, overrides: dict | list | None = None) -> str:
    """Scale a checkpoint's RoPE to a longer context and fine-tune it for ext.steps (0: training-free).
    overrides: train or model keys, as a dict of values or a list of --key=value flags.
    Returns the path of the new checkpoint."""
    overrides = overrides or {}
    names = {f.lstrip("-").partition("=")[0] for f in overrides} if isinstance(overrides, list) else set(overrides)
    for key in SET_BY_EXTENSION:
        if key in names:
            raise ConfigError(f"extend_context.py sets {key} itself: give --method, --factor or --target_len instead")
    for key in ("ckpt", "method"):
        if not getattr(ext, key):
            raise ConfigError(f"missing --{key}: e.g. --ckpt=out/cpu_rope/ckpt.pt --method=linear --factor=4")
    master = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 reports and writes
    log = print if master else (lambda *a, **k: None)
    ckpt = load_checkpoint(ext.ckpt)
    base = from_dict(train.TrainConfig, ckpt["config"])
    if ext.method == DROPE:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # its step-0 checkpoint is written before the processes meet
            raise ConfigError("drope's recalibration runs in one process: start it without torchrun")
        if ext.steps == 0:
            raise ConfigError("drope recalibrates the model without positions: give --steps > 0 (the paper spends the "
                              "last eighth of pretraining on it)")
        model_cfg, scaling = drope_config(base.model, ext.ckpt), None
        factor, base_len, target_len = 1.0, model_cfg.block_size, model_cfg.block_size
        out_dir = ext.out_dir or f"{Path(ext.ckpt).parent}_{DROPE}"
    else:
        scaling, target_len = rope_scaling_for(base.model, ext.method, ext.factor, ext.target_len, ext.scaling_params)
        model_cfg = check_extendable(base.model, scaling, target_len, ext.ckpt)
        factor, base_len = scaling["factor"], scaling["original_max_position_embeddings"]
        out_dir = ext.out_dir or f"{Path(ext.ckpt).parent}_{ext.method}{'_pose' if ext.pose else ''}_x{factor:g}"
    if ext.pose and model_cfg.pos_encoding != "rope":
        raise ConfigError(f"--pose shifts RoPE position ids; {ext.ckpt} has {model_cfg.pos_encoding!r} positions")
    seq_len = base_len if ext.pose or ext.method == DROPE else target_len  # tokens per training sequence
    world = int(os.environ.get("WORLD_SIZE", "1"))

    # batch: at most the base run's tokens per micro-step (so it fits where the base did), then accumulate
    base_tokens = base.batch_size * base.grad_accum_steps * base.model.block_size * world
    seqs = max(1, (ext.batch_tokens or base_tokens) // (seq_len * world))  # sequences per step per process
    micro = min(seqs, max(1, base.batch_size * base.model.block_size // seq_len))
    start = dataclasses.replace(
        base, **RECIPE, out_dir=out_dir, run_name="", resume=False, init_from=str(ext.ckpt), max_iters=ext.steps,
        lr_decay_iters=None, warmup_iters=min(MAX_WARMUP, ext.steps // 5),
        min_doc_len=target_len + 1 if seq_len == target_len else base.min_doc_len,  # PoSE, DroPE: the base's data
        pose_window=base_len if ext.pose else 0, device="auto", dtype="auto", compile="auto", batch_size=micro,
        grad_accum_steps=math.ceil(seqs / micro), model=model_cfg)
    cfg = parse(train.TrainConfig, overrides, defaults=start) if isinstance(overrides, list) else apply(start, overrides)
    if "batch_size" in names and "grad_accum_steps" not in names:  # a smaller micro-batch keeps the step's tokens
        cfg = dataclasses.replace(cfg, grad_accum_steps=math.ceil(seqs / cfg.batch_size))
    searched = None
    if ext.search:  # the found factors go into the checkpoint's rope_scaling (and so into sample, evaluate, export)
        from posenc.longrope_search import search_checkpoint
        searched = search_checkpoint(ext.ckpt, cfg.data_dir, target_len, factor, base_len, ext.search_budget,
                                     ext.search_docs, seed=cfg.seed, device=cfg.device, log=log)
        scaling = searched.scaling
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, rope_scaling=scaling))
    how = (f"{DROPE}: positions removed, recalibrated at {base_len} tokens" if ext.method == DROPE else
           f"{ext.method}{' + PoSE' if ext.pose else ''} x{factor:g}, {base_len} -> {target_len} tokens")
    log(f"extending {ext.ckpt} (step {ckpt.get('step')}): {how}, {ext.steps} fine-tuning steps of "
        f"{cfg.batch_size * cfg.grad_accum_steps * seq_len * world:,} tokens")

    record = {"base_ckpt": str(Path(ext.ckpt).resolve()), "base_step": ckpt.get("step"), "method": ext.method,
              "factor": factor, "original_len": base_len, "target_len": target_len, "steps": ext.steps}
    if ext.pose:
        record |= {"pose_window": cfg.pose_window, "pose_chunks": cfg.pose_chunks}
    if searched:
        record["search"] = {"loss": searched.loss, "start_losses": searched.starts, "candidates": searched.evaluated,
                            "docs": ext.search_docs, "seed": cfg.seed}
    if ext.steps > 0:
        if length_dependent(scaling):
            log(f"note: {ext.method} scaling changes with the length and is meant to be training-free; fine-tuning "
                "trains at the target length's frequencies, which shorter inputs will not use")
        if "min_doc_len" not in names and seq_len == target_len and ext.method != DROPE:
            n_long = n_long_documents(cfg.data_dir, "train", target_len + 1)
            n_docs = len(load_meta(cfg.data_dir)["docs"]["train"])
            log(f"{cfg.data_dir}: {n_long} of {n_docs} training documents have >= {target_len + 1} tokens")
            if n_long < MIN_LONG_DOCS:
                log(f"too few long documents (< {MIN_LONG_DOCS}): fine-tuning on windows over concatenated documents")
                cfg = dataclasses.replace(cfg, min_doc_len=0)
            record["n_long_docs"] = n_long
        record["min_doc_len"] = cfg.min_doc_len
    if ext.steps == 0:  # training-free: the base weights under the new config, in train.py's checkpoint format
        new, path = write_converted(ckpt, cfg, record)
    else:  # train.main loads the weights itself (init_from), owns out_dir, and raises if interrupted
        if ext.method == DROPE:  # init_from keeps a checkpoint's scheme: start from the weights under NoPE instead
            if not (cfg.resume and (Path(out_dir) / "ckpt.pt").exists()):
                train.seed_everything(cfg.seed)  # the RNG state a fresh run starts from, saved for its "resume"
                write_converted(ckpt, cfg, record, rng=rng_state())
            cfg = dataclasses.replace(cfg, resume=True, init_from="scratch")
        del ckpt
        result = train.main(cfg)
        if not master:
            return result["ckpt"]
        if result["ckpt"] is None:
            raise train.TrainingError(f"fine-tuning could not save a checkpoint in {out_dir} (see the error above)")
        new = load_checkpoint(result["ckpt"])
        new["extension"] = record | {"steps": result["step"]}
        path = save_checkpoint(new, result["ckpt"])
    if master:  # written last: it says the extension is complete
        write_atomic(Path(out_dir) / "extension.json", json.dumps(new["extension"], indent=2) + "\n")
    log(f"wrote {path}: rope_scaling={json.dumps(scaling)}, block_size={target_len}")
    return path


def write_converted(ckpt, cfg, record, rng=None):
    """The base weights under cfg.model, as a step-0 train.py checkpoint in cfg.out_dir -> (checkpoint, path)."""
    with torch.device("meta"):
        GPT(cfg.model)  # a bad config fails here, as it would at load time
    with claim(cfg.out_dir, resume=False, overwrite=cfg.overwrite, what="extension"):
        clear(cfg.out_dir)
        new = {"model": ckpt["model"], "optimizer": None, "step": 0, "config": to_dict(cfg), "rng": rng,
               "data": ckpt.get("data"), "best_val_loss": float("inf"), "format_version": FORMAT_VERSION,
               "extension": record}
        return new, save_checkpoint(new, Path(cfg.out_dir) / "ckpt.pt")


def main(argv=None) -> str:
    ext, overrides = parse(ExtendConfig, argv, passthrough=train.TrainConfig, doc=__doc__)
    return extend(ext, overrides)


if __name__ == "__main__":
    cli(main, errors=(ValueError, OSError, train.TrainingError))
