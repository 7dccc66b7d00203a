"""Checkpoints: atomic saves, safe loads (weights_only=True) and one-line errors, the model a checkpoint
describes, and every RNG's state (where a training run starts from: posenc/resume.py).

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

from model import GPT, GPTConfig
from posenc.config import from_dict

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
