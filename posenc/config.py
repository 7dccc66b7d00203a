"""Typed configuration for every script: dataclass defaults < a TOML file < command-line flags.

    python train.py configs/cpu.toml --pos_encoding=alibi --max_iters=100
    python reproduce.py --scale cpu          # `--key value` works too; a bare `--flag` means true

Each script owns a dataclass (train.TrainConfig, extend_context.ExtendConfig, sample.SampleConfig, ...); this
module parses and checks any of them. A field whose type is a dataclass (TrainConfig.model) is a nested table:
its keys are given flat (`--n_layer=2`) or dotted (`--model.n_layer=2`), in a TOML file flat or under
`[model]`. Types come from the annotations (bool, int, float, str, Literal choices, X | None, dict, list,
tuple[X, ...] as a comma-separated list); an unknown key or a bad value fails at once with one line
(ConfigError) naming the key and what it accepts. Each dataclass checks its values in __post_init__
(check_fields plus its own ranges), so a config built in Python is checked exactly like a command line.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import io
import json
import math
import sys
import tokenize
import types
import typing

try:
    import tomllib  # Python >= 3.11
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


class ConfigError(ValueError):
    """A bad config key or value, said in one line; the scripts print it as `error: ...`."""


# ----------------------------------------------------------------------------- fields and values

@functools.cache
def field_types(cls) -> dict[str, object]:
    """Field name -> resolved annotation, for a config dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _nested(tp) -> bool:
    return dataclasses.is_dataclass(tp) and isinstance(tp, type)


@functools.cache
def flat_keys(cls) -> dict[str, tuple[str, ...]]:
    """Every key a user may give -> its path: top-level fields, and each nested field flat and dotted."""
    keys = {}
    for name, tp in field_types(cls).items():
        if not _nested(tp):
            keys[name] = (name,)
            continue
        for sub in field_types(tp):
            if sub in field_types(cls):
                raise TypeError(f"{cls.__name__}.{name}.{sub} shadows {cls.__name__}.{sub}")  # a bug, not user input
            keys[sub] = keys[f"{name}.{sub}"] = (name, sub)
    return keys


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        args = [str(a).lower() if isinstance(a, bool) else a for a in args]
        return " or ".join(str(a) for a in args) if len(args) < 3 else ", ".join(map(str, args[:-1])) + f" or {args[-1]}"
    if origin is tuple:
        return f"a comma-separated list of {_type_name(args[0])}"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def parse_value(key: str, value, tp, text: bool):
    """value as the annotation `tp` asks, or ConfigError naming the key; text: a command-line string."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = ConfigError(f"bad value {value!r} for config key '{key}': expected {_type_name(tp)}")
    if origin in (typing.Union, types.UnionType):
        if value is None or (text and value.strip().lower() in ("none", "null")):
            if type(None) in args:
                return None
            raise bad
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"config key '{key}' has an unsupported type {tp}")
        return parse_value(key, value, inner[0], text)
    if origin is typing.Literal:
        if text and any(isinstance(a, bool) for a in args) and value.strip().lower() in ("true", "false"):
            value = value.strip().lower() == "true"  # Literal["auto", True, False]: --compile=true
        if not any(value == a and type(value) is type(a) for a in args):  # 1 is not True here
            raise bad
        return value
    if origin is tuple:  # tuple[X, ...]: a comma-separated list on the command line
        items = [s for s in value.split(",") if s.strip()] if text else value
        if not isinstance(items, (list, tuple)):
            raise bad
        return tuple(parse_value(key, v, args[0], text) for v in items)
    base = origin or tp
    if text and base is not str:
        value = _parse_text(value, base, bad)
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, base) or (base in (int, float) and isinstance(value, bool)):
        raise bad
    if base is float and not math.isfinite(value):
        raise ConfigError(f"bad value {value!r} for config key '{key}': expected a finite number")
    return value


def _parse_text(s: str, base, bad: ConfigError):
    s = s.strip()
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
            return json.loads(s)
    except (ValueError, OverflowError) as e:
        raise bad from e
    return s


def check_fields(obj) -> None:
    """Check (and normalize: int -> float) every field of a config dataclass against its annotation.
    Called first in each config's __post_init__."""
    for name, tp in field_types(type(obj)).items():
        value = getattr(obj, name)
        if _nested(tp):
            if not isinstance(value, tp):
                raise ConfigError(f"config key '{name}' must be a {tp.__name__}, got {type(value).__name__}")
            continue
        object.__setattr__(obj, name, parse_value(name, value, tp, text=False))


def at_least(obj, low, *names) -> None:
    """ConfigError unless each named number (None allowed) is >= low."""
    for name in names:
        value = getattr(obj, name)
        if value is not None and not value >= low:
            raise ConfigError(f"bad value {value!r} for config key '{name}': expected a number >= {low}")


def unknown_key(key: str, valid) -> ConfigError:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return ConfigError(f"unknown config key '{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))


def apply(cfg, updates: dict[str, object], text: bool = False):
    """A copy of cfg with flat or dotted updates; every value converted and the result checked."""
    top, nested = {}, {}
    keys, types_ = flat_keys(type(cfg)), field_types(type(cfg))
    for key, value in updates.items():
        if key not in keys:
            raise unknown_key(key.rpartition(".")[2], [k for k in keys if "." not in k])
        path = keys[key]
        if len(path) == 1:
            top[path[0]] = parse_value(path[0], value, types_[path[0]], text)
        else:
            sub_types = field_types(types_[path[0]])
            nested.setdefault(path[0], {})[path[1]] = parse_value(path[1], value, sub_types[path[1]], text)
    try:
        for name, sub in nested.items():
            top[name] = dataclasses.replace(getattr(cfg, name), **sub)
        return dataclasses.replace(cfg, **top)
    except ConfigError:
        raise
    except ValueError as e:  # a config's own check in __post_init__
        raise ConfigError(str(e)) from None


# ----------------------------------------------------------------------------- files and command lines

def read_toml(path: str, cls) -> dict[str, object]:
    """A TOML file as flat updates; nested dataclass fields may be tables (`[model]`)."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    flat = {}
    for key, value in data.items():
        tp = field_types(cls).get(key)
        if tp is not None and _nested(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"config file {path}: '{key}' must be a [{key}] table")
            for sub, v in value.items():
                if sub not in field_types(tp):
                    raise unknown_key(sub, field_types(tp))
                flat[f"{key}.{sub}"] = v
        else:
            flat[key] = value
    return flat


def split_argv(argv: list[str], keys) -> tuple[list[str], dict[str, str]]:
    """(positional arguments, {key: raw text}) from `--key=value`, `--key value` and bare `--flag`.
    `keys` maps known keys to their types (a bare flag is true only for a bool key)."""
    files, flags, i = [], {}, 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--"):
            files.append(arg)
            continue
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key == "config":
            files.append(value if eq else argv[i] if i < len(argv) else "")
            i += 0 if eq else 1
            continue
        if not eq:
            tp = keys.get(key)
            takes_value = tp is not None and not _is_bool(tp)
            if takes_value and i < len(argv) and not argv[i].startswith("--"):
                value, i = argv[i], i + 1
            elif takes_value:
                raise ConfigError(f"--{key} needs a value: --{key}=VALUE")
            else:
                value = "true"  # a bare flag; an unknown key fails later with a did-you-mean
        flags[key] = value
    return files, flags


def config_file(cls, argv: list[str]) -> str | None:
    """The TOML file a command line names (positional or --config=), or None."""
    files, _ = split_argv(argv, key_types(cls))
    return files[0] if files else None


def _is_bool(tp) -> bool:
    """bool, bool | None, or a Literal with True in it (compile: auto, true or false): a bare --flag is true."""
    args = typing.get_args(tp)
    return tp is bool or (typing.get_origin(tp) in (typing.Union, types.UnionType) and bool in args) or (
        typing.get_origin(tp) is typing.Literal and any(a is True for a in args))


def key_types(cls) -> dict[str, object]:
    """Every flat key a user may give for cls -> its annotation."""
    out = {}
    for key, path in flat_keys(cls).items():
        tp = field_types(cls)[path[0]]
        out[key] = tp if len(path) == 1 else field_types(tp)[path[1]]
    return out


def parse(cls, argv: list[str] | None = None, defaults=None, passthrough=None, doc: str | None = None,
          file_key: str | None = None):
    """Defaults (cls() or `defaults`), then a TOML file (positional or --config=), then flags.
    passthrough: another config class whose keys are accepted here by name and returned unparsed, as
    `(cfg, ["--key=value", ...])`, for a second parse against defaults known only later (extend_context).
    file_key: the file is not cls's keys but this key's value, read by the script itself (reproduce.py's scale).
    -h / --help prints every key with its default and comment, then exits."""
    argv = sys.argv[1:] if argv is None else list(argv)
    types_ = key_types(cls) | (key_types(passthrough) if passthrough else {})
    if "-h" in argv or "--help" in argv:
        print(help_text(cls, doc) + (f"\n\n{help_text(passthrough, '')}" if passthrough else ""))
        raise SystemExit(0)
    files, flags = split_argv(argv, types_)
    if len(files) > 1:
        raise ConfigError(f"give one config file, not {len(files)}: {' '.join(files)}")
    cfg = defaults if defaults is not None else cls()
    if files and file_key:
        if file_key in flags:
            raise ConfigError(f"give a config file or --{file_key}, not both")
        flags = {file_key: files[0], **flags}
    elif files:
        cfg = apply(cfg, read_toml(files[0], cls))
    own, rest = {}, []
    for key, value in flags.items():
        if key in flat_keys(cls):
            own[key] = value
        elif passthrough and key in flat_keys(passthrough):
            rest.append(f"--{key}={value}")
        else:
            raise unknown_key(key.rpartition(".")[2], [k for k in types_ if "." not in k])
    cfg = apply(cfg, own, text=True)
    return (cfg, rest) if passthrough else cfg


@functools.cache
def _comments(cls) -> dict[str, str]:
    """The `# comment` after each field in the class's source: the help text of that key."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out, name = {}, None
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and name is None:
            name = tok.string  # first name on a field line (class body, indent 4)
        elif tok.type == tokenize.COMMENT and name:
            out.setdefault(name, tok.string.lstrip("# "))
        elif tok.type == tokenize.NEWLINE:
            name = None
    return out


def help_text(cls, doc: str | None = None) -> str:
    """Usage (the script's docstring) and every key with its default and comment."""
    lines = [(doc if doc is not None else (cls.__doc__ or "")).strip()]
    defaults = cls()
    for name, tp in field_types(cls).items():
        if _nested(tp):
            lines += ["", f"{name} keys (flat or as --{name}.KEY):"]
            sub = getattr(defaults, name)
            lines += [_help_line(k, getattr(sub, k), _comments(tp).get(k)) for k in field_types(tp)]
    lines += ["", f"{cls.__name__} keys:"]
    lines += [_help_line(k, getattr(defaults, k), _comments(cls).get(k)) for k, tp in field_types(cls).items()
              if not _nested(tp)]
    return "\n".join(lines).strip()


def _help_line(key, default, comment) -> str:
    if isinstance(default, tuple):
        text = ",".join(map(str, default))
    elif isinstance(default, (dict, bool)) or default is None:
        text = json.dumps(default)  # as the command line takes it: true, null, {"rope_type": ...}
    else:
        text = default
    line = f"  --{key}={text}"
    return f"{line:<35} # {comment}" if comment else line


def to_dict(cfg) -> dict:
    """Plain nested dict, for config.json and checkpoints."""
    return dataclasses.asdict(cfg)


def from_dict(cls, d: dict):
    """Inverse of to_dict; an unknown key (a file from another version) is ConfigError with a did-you-mean."""
    d, kwargs = dict(d), {}
    for key, value in d.items():
        tp = field_types(cls).get(key)
        if tp is None:
            raise unknown_key(key, field_types(cls))
        kwargs[key] = from_dict(tp, value) if _nested(tp) and isinstance(value, dict) else value
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None
