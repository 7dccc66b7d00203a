"""Checkpoints: atomic saves, safe loads (weights_only=True) and one-line errors, and the model a run starts
from (build_model: scratch, another run's weights, or its own checkpoint, resumed only if it is the same run).

A checkpoint (ckpt.pt) is a dict of plain types and tensors only: {"model": state_dict of the uncompiled,
unwrapped GPT, "optimizer", "step", "config": asdict(TrainConfig) with the model nested, "rng"
(torch, cuda, numpy, python), "sampler": the train BatchSampler's state_dict, "data": data_identity,
"best_val_loss", "format_version"}, plus "ranks" (each DDP rank's rng) when trained on several.
"""
import dataclasses
import os
import random
import re
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from posenc.config import flat_keys, from_dict
from posenc.data import check_vocabulary, data_identity, same_data
from model import GPT, GPTConfig, RUNTIME_FIELDS
from posenc.run_folder import holds_run

FORMAT_VERSION = 1  # bump when the checkpoint layout changes


class CheckpointError(ValueError):
    """A missing, corrupt or mismatched checkpoint, said in one line."""


def save_checkpoint(ckpt: dict, path) -> str:
    """Write atomically: a temporary file in the same folder, fsync, then rename over the old checkpoint.
    On failure the previous checkpoint is untouched and CheckpointError says why."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"could not save checkpoint {path}: {e} (the previous one is kept)") from e
    return str(path)


def load_checkpoint(path, map_location="cpu") -> dict:
    """torch.load(weights_only=True) with one clear line for a missing, corrupt or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: train one first (python train.py ... --out_dir={path.parent})")
    try:
        with warnings.catch_warnings():  # torch warns (in several lines) about pickles it then refuses
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, non-plain objects: torch's messages span many lines
        msg = " ".join(str(e).split()) or type(e).__name__
        unsafe = re.search(r"GLOBAL ([\w.]+)", msg)
        if unsafe:  # a readable pickle, but with code or objects that train.py never writes
            raise CheckpointError(f"checkpoint {path} holds pickled code or objects that a safe load refuses "
                                  f"({unsafe.group(1)}): it was not written by train.py and is not loaded "
                                  "(loading it unsafely could run that code)") from None
        if not zipfile.is_zipfile(path) and path.read_bytes()[:1] == b"\x80":  # pickle's PROTO opcode
            raise CheckpointError(f"checkpoint {path} is a plain pickle, not a file train.py writes: it is not loaded "
                                  "(a pickle can run code)") from None
        reason = msg.partition("WeightsUnpickler error:")[2].partition(" Check the documentation")[0].strip()
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated: {reason or msg.partition('. ')[0]}") from None
    missing = [k for k in ("model", "config", "format_version") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a train.py checkpoint (no {', '.join(missing)})")
    if ckpt["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format_version {ckpt['format_version']}; "
                              f"this train.py reads up to {FORMAT_VERSION}: update the code")
    return ckpt


def model_config(ckpt: dict, path) -> GPTConfig:
    try:
        return from_dict(GPTConfig, ckpt["config"]["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} has a bad model config: {e}") from None


def load_weights(model: GPT, state_dict: dict, path) -> GPT:
    """Strict load; a mismatch (another scheme or size) is one line naming the offending keys."""
    own = model.state_dict()
    missing = sorted(own.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - own.keys())
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
              for k in sorted(own.keys() & state_dict.keys()) if own[k].shape != state_dict[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{name}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                 for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)) if keys]
        c = model.config
        shape = f"block_size={c.block_size}, n_layer={c.n_layer}, n_embd={c.n_embd}"
        raise CheckpointError(f"checkpoint {path} does not fit a {c.pos_encoding} model with {shape} "
                              f"({'; '.join(parts)}): another scheme or size?")
    model.load_state_dict(state_dict)
    return model


def model_from_checkpoint(path, device="cpu", override_scaling=None):
    """Build the GPT a checkpoint describes and load its weights -> (model in eval mode, checkpoint dict).
    override_scaling: a rope_scaling dict to use instead of the checkpoint's own ({} for none); saying so."""
    ckpt = load_checkpoint(path, "cpu")
    config = model_config(ckpt, path)
    if override_scaling is not None:
        override_scaling = override_scaling or None
        if override_scaling != config.rope_scaling:
            print(f"note: {path} was trained with rope_scaling={config.rope_scaling}; using {override_scaling} "
                  "as explicitly asked", file=sys.stderr)
        config = dataclasses.replace(config, rope_scaling=override_scaling)
    model = load_weights(GPT(config), ckpt["model"], path)
    return model.to(device).eval(), ckpt


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


def rng_state() -> dict:
    """Every RNG as plain types and tensors (weights_only=True can load them)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, state, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": [version, list(state), gauss_next]}


def set_rng_state(s: dict):
    torch.set_rng_state(s["torch"].cpu())
    if s["cuda"] and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([t.cpu() for t in s["cuda"]])
    kind, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((kind, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, state, gauss_next = s["python"]
    random.setstate((version, tuple(state), gauss_next))
