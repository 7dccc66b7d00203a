"""config.py: defaults < TOML file < --key=value flags, typed values, one-line errors that name the key."""
import dataclasses
from pathlib import Path

import pytest

from config import ConfigError, TrainConfig, config_from_dict, config_to_dict, load_config
from model import GPTConfig
from positions import SCHEMES

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path, text):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return str(path)


def test_defaults_come_from_the_dataclasses():
    assert load_config([]) == TrainConfig()
    assert load_config([]).model == GPTConfig()


def test_file_overrides_defaults_and_flags_override_file(tmp_path):
    path = write(tmp_path, 'batch_size = 3\nlearning_rate = 2e-3\nout_dir = "out/x"\n'
                           '[model]\nn_layer = 3\npos_encoding = "alibi"\n')
    cfg = load_config([path])
    assert (cfg.batch_size, cfg.learning_rate, cfg.out_dir) == (3, 2e-3, "out/x")
    assert (cfg.model.n_layer, cfg.model.pos_encoding) == (3, "alibi")
    assert cfg.max_iters == TrainConfig.max_iters  # untouched keys keep their defaults
    cfg = load_config([f"--config={path}", "--batch_size=5", "--n_layer=1", "--model.n_embd=64"])
    assert (cfg.batch_size, cfg.model.n_layer, cfg.model.n_embd, cfg.model.pos_encoding) == (5, 1, 64, "alibi")


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
    assert load_config(["--compile"]).compile is True  # a bare flag means true
    assert load_config(["--rope_scaling=none", "--rope_scaling=null"]).model.rope_scaling is None


def test_toml_values_are_type_checked(tmp_path):
    text = 'learning_rate = 1\n[model]\nrope_scaling = {rope_type = "yarn", factor = 8.0}\n'
    cfg = load_config([write(tmp_path, text)])
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)  # an int is a fine float
    assert cfg.model.rope_scaling == {"rope_type": "yarn", "factor": 8.0}
    with pytest.raises(ConfigError, match="bad value '16' for config key 'batch_size': expected int"):
        load_config([write(tmp_path, 'batch_size = "16"\n')])
    with pytest.raises(ConfigError, match="config key 'compile': expected bool"):
        load_config([write(tmp_path, "compile = 1\n")])


def test_unknown_key_names_the_closest_valid_one(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(["--n_layr=2"])
    assert str(e.value) == "unknown config key 'n_layr' (did you mean 'n_layer'?)"
    with pytest.raises(ConfigError, match=r"unknown config key 'learning_rat' \(did you mean 'learning_rate'\?\)"):
        load_config([write(tmp_path, "learning_rat = 1e-3\n")])
    with pytest.raises(ConfigError, match=r"unknown config key 'n_embed' \(did you mean 'n_embd'\?\)"):
        load_config([write(tmp_path, "[model]\nn_embed = 64\n")])
    with pytest.raises(ConfigError, match=r"unknown config key 'batch_size' \(did you mean"):
        load_config(["--model.batch_size=2"])  # model.<key> only names model keys
    with pytest.raises(ConfigError) as e:
        load_config(["--zzzzqqq=1"])
    assert str(e.value) == "unknown config key 'zzzzqqq'"


@pytest.mark.parametrize("flag, message", [
    ("--batch_size=lots", "bad value 'lots' for config key 'batch_size': expected int"),
    ("--max_iters=3.5", "bad value '3.5' for config key 'max_iters': expected int"),
    ("--learning_rate=fast", "bad value 'fast' for config key 'learning_rate': expected float"),
    ("--compile=maybe", "bad value 'maybe' for config key 'compile': expected bool"),
    ("--rope_scaling={factor: 4}", "bad value '{factor: 4}' for config key 'rope_scaling': expected dict"),
    ("--rope_scaling=[4]", "bad value '[4]' for config key 'rope_scaling': expected dict"),
    ("--wandb=yes", "bad value 'yes' for config key 'wandb': expected off, offline or online"),
])
def test_bad_values_name_key_value_and_type(flag, message):
    with pytest.raises(ConfigError) as e:
        load_config([flag])
    assert str(e.value) == message and "\n" not in str(e.value)


def test_file_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="config file nope.toml not found"):
        load_config(["nope.toml"])
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config([write(tmp_path, "batch_size = = 3\n")])
    with pytest.raises(ConfigError, match="give one config file"):
        load_config(["a.toml", "b.toml"])


def test_train_and_model_key_names_are_disjoint():
    train = {f.name for f in dataclasses.fields(TrainConfig)}
    assert not train & {f.name for f in dataclasses.fields(GPTConfig)}


def test_dict_round_trip():
    cfg = load_config(["--n_layer=2", "--pos_encoding=alibi", '--rope_scaling={"rope_type": "yarn", "factor": 2.0}'])
    d = config_to_dict(cfg)
    assert d["model"]["n_layer"] == 2 and d["batch_size"] == cfg.batch_size
    assert config_from_dict(d) == cfg
    with pytest.raises(ConfigError, match="unknown config key 'batch_siz'"):
        config_from_dict({**d, "batch_siz": 1})


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_parse_and_name_their_scheme(path):
    cfg = load_config([str(path)])
    scheme = path.stem.rsplit("_", 1)[-1]
    assert scheme in SCHEMES and cfg.model.pos_encoding == scheme
    assert Path(cfg.out_dir).name == path.stem  # each config writes its own run folder


def test_every_scheme_has_its_configs():
    for prefix in ("cpu", "gpu30m", "gpt2_124m"):
        for scheme in SCHEMES:
            assert (ROOT / "configs" / f"{prefix}_{scheme}.toml").is_file(), f"configs/{prefix}_{scheme}.toml missing"


def test_model_value_checks_become_config_errors():
    with pytest.raises(ConfigError, match="unknown pos_encoding 'rotary'; choose one of"):
        load_config(["--pos_encoding=rotary"])


def test_help_lists_every_key_with_its_default(capsys):
    with pytest.raises(SystemExit) as e:
        load_config(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--learning_rate=0.001" in out and "--pos_encoding='rope'" in out
