"""Typed configuration: dataclass defaults < a TOML file in configs/ < `--key=value` flags.

    python train.py configs/cpu_rope.toml --max_iters=100 --n_layer=2 --rope_scaling='{"rope_type":"linear","factor":4}'

Train keys sit at the top level of a TOML file, model keys in a `[model]` table (or flat at the top: the two
sets of names are disjoint). On the command line model keys are flat (`--n_layer=2`) or dotted
(`--model.n_layer=2`). An unknown key or a value of the wrong type fails at once with one line (ConfigError).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import sys
import types
import typing
from dataclasses import dataclass, field

try:
    import tomllib  # Python >= 3.11
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from model import GPTConfig


class ConfigError(ValueError):
    """A bad config key or value; scripts print it as one line: sys.exit(f"error: {e}")."""


@dataclass
class TrainConfig:
    out_dir: str = "out/run"
    data_dir: str = "data/stdlib"
    seed: int = 1337
    device: str = "auto"              # auto: cuda if available, else cpu
    dtype: str = "auto"               # auto: bfloat16 autocast on cuda if supported, else float32
    compile: bool = False             # torch.compile the model for training (checkpoints stay uncompiled)
    batch_size: int = 16              # sequences per micro-step (per GPU)
    grad_accum_steps: int = 1         # micro-steps per optimizer step
    max_iters: int = 500              # optimizer steps
    learning_rate: float = 1e-3
    min_lr: float = 1e-4              # cosine decay ends here
    warmup_iters: int = 50            # linear warmup steps
    lr_decay_iters: int | None = None  # None: max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0            # 0 disables clipping
    eval_interval: int = 100          # steps between validation losses (0: only at the end)
    eval_iters: int = 20              # validation batches per evaluation
    log_interval: int = 10            # steps between train log lines
    ckpt_interval: int = 100          # steps between checkpoints (0: only the final one, always written)
    wandb: str = "off"                # off | offline (no account, no network) | online
    wandb_project: str = "posenc"
    run_name: str = ""                # "" : the basename of out_dir
    resume: bool = False              # continue exactly from <out_dir>/ckpt.pt
    init_from: str = "scratch"        # scratch | path of a checkpoint whose weights start this run
    min_doc_len: int = 0              # >0: train only on windows inside documents at least this long
    peak_flops: float = 989e12        # for MFU: H100 bf16 dense
    model: GPTConfig = field(default_factory=GPTConfig)


def _fields(cls) -> dict[str, object]:
    """Field name -> resolved type annotation."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(key: str, value, tp, text: bool):
    """Convert a value to the field type `tp` or raise ConfigError; text: a command-line string to parse."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (text and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _convert(key, value, inner[0], text)
        raise ConfigError(f"config key '{key}' has an unsupported type {tp}")
    base = origin or tp
    bad = ConfigError(f"bad value {value!r} for config key '{key}': expected {_type_name(tp)}")
    if text and base is not str:
        s = value.strip()
        try:
            if base is bool:
                if s.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise bad
                return s.lower() in ("true", "1", "yes")
            if base is int:
                number = float(s)  # accepts 1e4
                if not number.is_integer():
                    raise bad
                return int(s) if s.lstrip("+-").isdigit() else int(number)
            if base is float:
                return float(s)
            if base in (dict, list):
                value = json.loads(s)
        except (ValueError, OverflowError) as e:
            raise bad from e
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is bool and not isinstance(value, bool):
        raise bad
    if base is int and isinstance(value, bool):
        raise bad
    if not isinstance(value, base):
        raise bad
    return value


def _unknown(key: str, valid) -> ConfigError:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _apply(cfg: TrainConfig, updates: dict[str, object], text: bool) -> TrainConfig:
    """Return cfg with flat updates applied; keys may be train keys, model keys or 'model.<key>'."""
    train_types = {k: t for k, t in _fields(type(cfg)).items() if k != "model"}
    model_types = _fields(type(cfg.model))
    train, model = {}, {}
    for key, value in updates.items():
        name = key.removeprefix("model.")
        if key in train_types:
            train[key] = _convert(key, value, train_types[key], text)
        elif name in model_types:
            model[name] = _convert(name, value, model_types[name], text)
        else:
            valid = list(train_types) + list(model_types) if name == key else list(model_types)
            raise _unknown(name, valid)
    try:  # GPTConfig checks its own values (e.g. pos_encoding) in __post_init__
        return dataclasses.replace(cfg, **train, model=dataclasses.replace(cfg.model, **model))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _flatten_toml(path: str) -> dict[str, object]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    flat = {k: v for k, v in data.items() if k != "model"}
    model = data.get("model", {})
    if not isinstance(model, dict):
        raise ConfigError(f"config file {path}: 'model' must be a [model] table")
    model_types = _fields(GPTConfig)
    for k, v in model.items():
        if k not in model_types:
            raise _unknown(k, model_types)
        flat[f"model.{k}"] = v
    return flat


def load_config(argv: list[str] | None = None, defaults_cls=TrainConfig) -> TrainConfig:
    """Defaults, then a TOML file (positional or --config=), then --key=value flags (sys.argv[1:] if None)."""
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(help_text(defaults_cls()))
        raise SystemExit(0)
    files, flags = [], {}
    for arg in argv:
        if not arg.startswith("--"):
            files.append(arg)
            continue
        key, eq, value = arg[2:].partition("=")
        if key == "config":
            files.append(value)
        else:
            flags[key.replace("-", "_")] = value if eq else "true"  # bare --flag means true
    if len(files) > 1:
        raise ConfigError(f"give one config file, not {len(files)}: {' '.join(files)}")
    cfg = defaults_cls()
    if files:
        cfg = _apply(cfg, _flatten_toml(files[0]), text=False)
    cfg = _apply(cfg, flags, text=True)
    if cfg.wandb not in ("off", "offline", "online"):
        raise ConfigError(f"bad value {cfg.wandb!r} for config key 'wandb': expected off, offline or online")
    return cfg


def help_text(cfg: TrainConfig) -> str:
    """Usage and every key with its default, as --help prints them."""
    lines = [__doc__.strip(), "", "train keys:"]
    lines += [f"  --{k}={getattr(cfg, k)!r}" for k in _fields(type(cfg)) if k != "model"]
    lines += ["model keys:"] + [f"  --{k}={getattr(cfg.model, k)!r}" for k in _fields(type(cfg.model))]
    return "\n".join(lines)


def config_to_dict(cfg: TrainConfig) -> dict:
    """Plain nested dict (model under 'model'), for config.json and checkpoints."""
    return dataclasses.asdict(cfg)


def model_config_from_dict(d: dict) -> GPTConfig:
    """GPTConfig from a checkpoint's dict; an unknown key (a checkpoint from another version) is ConfigError."""
    for k in d:
        if k not in _fields(GPTConfig):
            raise _unknown(k, _fields(GPTConfig))
    try:
        return GPTConfig(**d)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad model config: {e}") from None


def config_from_dict(d: dict, defaults_cls=TrainConfig) -> TrainConfig:
    """Inverse of config_to_dict; unknown keys raise ConfigError."""
    d = dict(d)
    model = model_config_from_dict(d.pop("model", {}))
    train_types = {k: t for k, t in _fields(defaults_cls).items() if k != "model"}
    for k in d:
        if k not in train_types:
            raise _unknown(k, train_types)
    return defaults_cls(**d, model=model)
