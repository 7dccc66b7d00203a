"""posenc/config.py: defaults < TOML file < flags for any config dataclass, typed values, one-line errors that name the key."""
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

import reproduce
from model import GPTConfig
from posenc.cli import cli
from posenc.config import ConfigError, check_fields, from_dict, parse, to_dict
from posenc.positions import SCHEMES
from train import TrainConfig, load_config

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path, text):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return str(path)


def test_defaults_come_from_the_dataclasses():
    cfg = load_config([])
    assert dataclasses.replace(cfg, out_dir=TrainConfig.out_dir) == TrainConfig()
    assert cfg.model == GPTConfig() and cfg.out_dir == "out/run_rope"


def test_file_overrides_defaults_and_flags_override_file(tmp_path):
    path = write(tmp_path, 'batch_size = 3\nlearning_rate = 2e-3\nout_dir = "out/x"\n'
                           '[model]\nn_layer = 3\npos_encoding = "alibi"\n')
    cfg = load_config([path])
    assert (cfg.batch_size, cfg.learning_rate, cfg.out_dir) == (3, 2e-3, "out/x")
    assert (cfg.model.n_layer, cfg.model.pos_encoding) == (3, "alibi")
    assert cfg.max_iters == TrainConfig.max_iters  # untouched keys keep their defaults
    cfg = load_config([f"--config={path}", "--batch_size=5", "--n_layer=1", "--model.n_embd=64"])
    assert (cfg.batch_size, cfg.model.n_layer, cfg.model.n_embd, cfg.model.pos_encoding) == (5, 1, 64, "alibi")


def test_key_value_with_a_space_and_bare_flags():
    cfg = load_config(["--batch_size", "5", "--compile", "--warmup_iters", "7", "--pos_encoding", "none"])
    assert (cfg.batch_size, cfg.compile, cfg.warmup_iters, cfg.model.pos_encoding) == (5, True, 7, "none")
    assert cfg.out_dir == "out/run_none"  # no value was taken for a config file
    assert load_config(["--batch_size", "5", "configs/cpu.toml"]).out_dir == "out/cpu_rope"
    with pytest.raises(ConfigError, match="bad value -5 for config key 'max_iters': expected a number >= 0"):
        load_config(["--max_iters", "-5"])  # a negative number is a value, not a flag
    with pytest.raises(ConfigError, match="--batch_size needs a value: --batch_size=VALUE"):
        load_config(["--batch_size"])


def test_model_keys_may_sit_at_the_top_of_a_file(tmp_path):
    cfg = load_config([write(tmp_path, 'n_layer = 2\npos_encoding = "none"\n')])
    assert (cfg.model.n_layer, cfg.model.pos_encoding) == (2, "none")


def test_values_are_parsed_by_the_field_type():
    cfg = load_config(["--learning_rate=1e-3", "--max_iters=2e3", "--compile=true", "--resume=0", "--wandb=offline",
                       "--lr_decay_iters=none", "--dropout=0", "--bias=1",
                       '--rope_scaling={"rope_type": "linear", "factor": 4}', "--data_dir=data/x"])
    assert cfg.learning_rate == 1e-3 and isinstance(cfg.learning_rate, float)
    assert cfg.max_iters == 2000 and isinstance(cfg.max_iters, int)
    assert cfg.compile is True and cfg.resume is False and cfg.model.bias is True
    assert cfg.lr_decay_iters is None and cfg.model.dropout == 0.0 and isinstance(cfg.model.dropout, float)
    assert cfg.model.rope_scaling == {"rope_type": "linear", "factor": 4}
    assert load_config(["--lr_decay_iters=300"]).lr_decay_iters == 300
    assert load_config(["--rope_scaling=none", "--rope_scaling=null"]).model.rope_scaling is None


def test_toml_values_are_type_checked(tmp_path):
    text = 'learning_rate = 1\n[model]\nrope_scaling = {rope_type = "yarn", factor = 8.0, original_max_position_embeddings = 256}\n'
    cfg = load_config([write(tmp_path, text)])
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)  # an int is a fine float
    assert cfg.model.rope_scaling["factor"] == 8.0
    with pytest.raises(ConfigError, match="bad value '16' for config key 'batch_size': expected int"):
        load_config([write(tmp_path, 'batch_size = "16"\n')])
    with pytest.raises(ConfigError, match="config key 'compile': expected auto, true or false"):
        load_config([write(tmp_path, "compile = 1\n")])


def test_unknown_key_names_the_closest_valid_one(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(["--n_layr=2"])
    assert str(e.value) == "unknown config key 'n_layr' (did you mean 'n_layer'?)"
    with pytest.raises(ConfigError, match=r"unknown config key 'learning_rat' \(did you mean 'learning_rate'\?\)"):
        load_config([write(tmp_path, "learning_rat = 1e-3\n")])
    with pytest.raises(ConfigError, match=r"unknown config key 'n_embed' \(did you mean 'n_embd'\?\)"):
        load_config([write(tmp_path, "[model]\nn_embed = 64\n")])
    with pytest.raises(ConfigError, match=r"unknown config key 'batch_size'"):
        load_config(["--model.batch_size=2"])  # model.<key> only names model keys
    with pytest.raises(ConfigError) as e:
        load_config(["--zzzzqqq=1"])
    assert str(e.value) == "unknown config key 'zzzzqqq'"


@pytest.mark.parametrize("flag, message", [
    ("--batch_size=lots", "bad value 'lots' for config key 'batch_size': expected int"),
    ("--max_iters=3.5", "bad value '3.5' for config key 'max_iters': expected int"),
    ("--learning_rate=fast", "bad value 'fast' for config key 'learning_rate': expected float"),
    ("--learning_rate=nan", "bad value nan for config key 'learning_rate': expected a finite number"),
    ("--compile=maybe", "bad value 'maybe' for config key 'compile': expected auto, true or false"),
    ("--rope_scaling={factor: 4}", "bad value '{factor: 4}' for config key 'rope_scaling': expected dict"),
    ("--rope_scaling=[4]", "bad value '[4]' for config key 'rope_scaling': expected dict"),
    ("--wandb=yes", "bad value 'yes' for config key 'wandb': expected off, offline or online"),
    ("--dtype=float16", "bad value 'float16' for config key 'dtype': expected auto, float32 or bfloat16"),
    ("--batch_size=0", "bad value 0 for config key 'batch_size': expected a number >= 1"),
    ("--out_dir=out/{pos_encodin}", "bad value 'out/{pos_encodin}' for config key 'out_dir': no config key"),
])
def test_bad_values_name_key_value_and_type(flag, message):
    with pytest.raises(ConfigError) as e:
        load_config([flag])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_file_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="config file nope.toml not found"):
        load_config(["nope.toml"])
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config([write(tmp_path, "batch_size = = 3\n")])
    with pytest.raises(ConfigError, match="give one config file"):
        load_config(["a.toml", "b.toml"])


def test_dict_round_trip():
    cfg = load_config(["--n_layer=2", "--pos_encoding=alibi", "--grad_clip=0.5"])
    d = to_dict(cfg)
    assert d["model"]["n_layer"] == 2 and d["batch_size"] == cfg.batch_size
    assert from_dict(TrainConfig, d) == cfg
    with pytest.raises(ConfigError, match="unknown config key 'batch_siz'"):
        from_dict(TrainConfig, {**d, "batch_siz": 1})


TRAIN_CONFIGS = sorted(set((ROOT / "configs").glob("*.toml")) - set(reproduce.presets().values()))  # no scales


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_one_config_per_scale_trains_any_scheme_in_its_own_folder(path, scheme):
    cfg = load_config([str(path), f"--pos_encoding={scheme}"])
    assert cfg.model.pos_encoding == scheme and cfg.out_dir == f"out/{path.stem}_{scheme}"


def test_reproduce_uses_the_shipped_configs():
    for path in reproduce.presets().values():
        assert (ROOT / "configs" / f"{reproduce.load_scale(path).config}.toml") in TRAIN_CONFIGS


def test_model_value_checks_become_config_errors():
    with pytest.raises(ConfigError, match="unknown pos_encoding 'rotary'; choose one of"):
        load_config(["--pos_encoding=rotary"])


def test_help_lists_every_key_with_its_default_and_comment(capsys):
    with pytest.raises(SystemExit) as e:
        load_config(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--learning_rate=0.001" in out and "--pos_encoding=rope" in out
    assert "--compile=auto" in out and "# torch.compile for training" in out


# ----------------------------------------------------------------------------- any dataclass, any script

@dataclass
class Toy:
    name: str = "x"  # a name
    mode: Literal["a", "b"] = "a"
    sizes: tuple[int, ...] = (1, 2)
    limit: float | None = None
    model: GPTConfig = field(default_factory=GPTConfig)

    def __post_init__(self):
        check_fields(self)


def test_parse_works_for_any_config_dataclass():
    cfg = parse(Toy, ["--mode", "b", "--sizes=3,4,5", "--limit=2", "--model.n_layer=1", "--n_head=2"])
    assert (cfg.mode, cfg.sizes, cfg.limit, cfg.model.n_layer, cfg.model.n_head) == ("b", (3, 4, 5), 2.0, 1, 2)
    with pytest.raises(ConfigError, match="config key 'mode': expected a or b"):
        parse(Toy, ["--mode=c"])
    with pytest.raises(ConfigError, match="bad value 'x' for config key 'sizes': expected int"):
        parse(Toy, ["--sizes=3,x"])
    with pytest.raises(ConfigError, match="config key 'mode': expected a or b"):
        Toy(mode="c")  # a config made in Python is checked the same way
    cfg, rest = parse(Toy, ["--name=y", "--learning_rate=1e-3"], passthrough=TrainConfig)
    assert cfg.name == "y" and rest == ["--learning_rate=1e-3"]


def test_reproduce_command_line(capsys):
    with pytest.raises(SystemExit) as e:
        reproduce.main(["--help"])
    assert e.value.code == 0 and "--scale=cpu" in capsys.readouterr().out
    for argv, message in [(["--scale", "tpu"], "config key 'scale': choose cpu, cpu4k, cpu-quick, gpu"),
                          (["--scal=gpu"], "unknown config key 'scal' (did you mean 'scale'?)"),
                          (["--scale"], "--scale needs a value")]:
        with pytest.raises(SystemExit) as e:
            cli(reproduce.main, argv)
        assert str(e.value).startswith("error: ") and message in str(e.value) and "\n" not in str(e.value)
