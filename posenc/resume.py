"""Where a training run starts: from scratch, from another run's weights (init_from), or from its own checkpoint,
resumed only if it is the same run (the same architecture and data; changed optimizer settings are printed)."""
import dataclasses
import os
from pathlib import Path

from model import GPT, RUNTIME_FIELDS, GPTConfig
from posenc.checkpoint import CheckpointError, load_checkpoint, load_weights, model_config
from posenc.config import flat_keys
from posenc.data import check_vocabulary, data_identity, same_data
from posenc.run_folder import holds_run


def build_model(cfg):
    """(config, model, checkpoint to restore) for a train.TrainConfig: from scratch, from init_from's weights, or
    resumed from out_dir/ckpt.pt."""
    ckpt_path = Path(cfg.out_dir) / "ckpt.pt"
    if cfg.resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        check_resumable(cfg, ckpt, ckpt_path)
        saved = dataclasses.replace(model_config(ckpt, ckpt_path), **{k: getattr(cfg.model, k) for k in RUNTIME_FIELDS})
        cfg = dataclasses.replace(cfg, model=saved)
        return cfg, load_weights(GPT(saved), ckpt["model"], ckpt_path), ckpt
    if cfg.resume and not holds_run(cfg.out_dir):
        raise CheckpointError(f"nothing to resume in {cfg.out_dir}: no run was started there (drop --resume=true)")
    if cfg.resume:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"note: the run in {cfg.out_dir} stopped before its first checkpoint: it starts again from step 0")
        cfg = dataclasses.replace(cfg, resume=False)
    if cfg.init_from != "scratch":  # weights only; this run's length, scaling and runtime settings
        init = load_checkpoint(cfg.init_from)
        check_vocabulary(init.get("data"), data_identity(cfg.data_dir), f"init_from checkpoint {cfg.init_from}")
        config = dataclasses.replace(model_config(init, cfg.init_from), block_size=cfg.model.block_size,
                                     rope_scaling=cfg.model.rope_scaling,
                                     **{k: getattr(cfg.model, k) for k in RUNTIME_FIELDS})
        cfg = dataclasses.replace(cfg, model=config)
        return cfg, load_weights(GPT(config), init["model"], cfg.init_from), None
    return cfg, GPT(cfg.model), None


def check_resumable(cfg, ckpt: dict, path) -> None:
    """A resumed run is the same run: the architecture and the data may not change (ValueError naming the
    difference); optimizer and schedule settings may, and the changes are printed."""
    saved_model, saved = model_config(ckpt, path), ckpt["config"]
    arch = [f"{f.name}={getattr(cfg.model, f.name)!r} (the checkpoint has {getattr(saved_model, f.name)!r})"
            for f in dataclasses.fields(GPTConfig)
            if f.name not in RUNTIME_FIELDS and getattr(cfg.model, f.name) != getattr(saved_model, f.name)]
    if arch:
        raise ValueError(f"cannot resume {path} with another architecture: {', '.join(arch)}; resume with the run's "
                         f"own settings, or start a new run from these weights with --init_from={path}")
    if not same_data(ckpt.get("data"), data_identity(cfg.data_dir)):
        raise ValueError(f"cannot resume {path} on other data: {cfg.data_dir} holds other tokens than this run was "
                         f"trained on; resume with its data_dir, or start a new run from these weights with "
                         f"--init_from={path}")
    skip = {"resume", "overwrite", "model", "init_from", "device", "out_dir", "run_name", "wandb"}
    changed = [f"{k} {saved[k]!r} -> {getattr(cfg, k)!r}" for k in saved
               if k not in skip and k in flat_keys(type(cfg)) and saved[k] != getattr(cfg, k)]
    if changed and int(os.environ.get("RANK", 0)) == 0:
        print(f"note: resuming {path} with changed settings: {', '.join(changed)}")
