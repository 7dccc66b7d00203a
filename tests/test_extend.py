"""extend_context.py end to end on CPU: train a tiny RoPE model at 32 tokens, extend it x4 with Position
Interpolation to 128, and check that a few dozen fine-tuning steps beat the unscaled model at 128.

The corpus is a few standard-library packages copied under our own file names, so the train/val split
(a hash of the name) does not depend on the Python version.
"""

import os
import re

import pytest
import torch
from conftest import stdlib_corpus

import extend_context
import train
from data.prepare import prepare
from extend_context import ExtendConfig, extend
from model import GPTConfig
from posenc.checkpoint import load_checkpoint, model_from_checkpoint
from posenc.cli import cli
from posenc.data import BatchSampler
from train import TrainConfig

BASE_LEN, TARGET_LEN = 32, 128
PACKAGES = ("email", "json", "http", "logging", "importlib", "asyncio")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("extend")
    return stdlib_corpus(root, PACKAGES)


def train_tiny(root, name, pos_encoding="rope", max_iters=150):
    cfg = TrainConfig(out_dir=str(root / name), data_dir=str(root / "data"), batch_size=8, max_iters=max_iters,
                      learning_rate=3e-3, min_lr=3e-4, warmup_iters=10, eval_interval=10_000, eval_iters=2,
                      log_interval=50, ckpt_interval=10_000, seed=0,
                      model=GPTConfig(block_size=BASE_LEN, n_layer=2, n_head=2, n_embd=64, pos_encoding=pos_encoding))
    return train.main(cfg)["ckpt"]


@pytest.fixture(scope="module")
def trained_ckpt(corpus):
    return train_tiny(corpus, "base")


@pytest.fixture(scope="module")
def base_ckpt(corpus):  # a few steps: enough for tests about files, configs and messages
    return train_tiny(corpus, "quick", max_iters=5)


def val_loss(ckpt, data_dir, T=TARGET_LEN, batches=8):
    """Mean loss on the same fixed validation windows of length T for every model."""
    model, _ = model_from_checkpoint(ckpt)
    sampler = BatchSampler(data_dir, "val", 8, T, seed=123)
    with torch.no_grad():
        return sum(model(*sampler.next())[1].item() for _ in range(batches)) / batches


@pytest.mark.slow
def test_position_interpolation_fine_tune_beats_the_unscaled_model_at_4x(corpus, trained_ckpt, capsys):
    base_ckpt = trained_ckpt
    path = extend(ExtendConfig(ckpt=base_ckpt, method="linear", factor=4, steps=40, out_dir=str(corpus / "pi")),
                  dict(learning_rate=1e-3, batch_size=4, eval_iters=2, log_interval=20))
    out = capsys.readouterr().out
    assert "training documents have >= 129 tokens" in out
    assert "step 40 | val loss" in out  # train.py's own loop and logging
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 40 and ckpt["config"]["min_doc_len"] == TARGET_LEN + 1
    assert ckpt["config"]["model"]["block_size"] == TARGET_LEN
    assert ckpt["config"]["model"]["rope_scaling"] == {"rope_type": "linear", "factor": 4.0,
                                                       "original_max_position_embeddings": BASE_LEN}
    record = ckpt["extension"]
    assert record["method"] == "linear" and record["factor"] == 4.0 and record["steps"] == 40
    assert record["original_len"] == BASE_LEN and record["base_step"] == 150
    assert record["base_ckpt"] == os.path.abspath(base_ckpt)

    data = str(corpus / "data")
    unscaled, extended = val_loss(base_ckpt, data), val_loss(path, data)
    print(f"loss at {TARGET_LEN}: unscaled base {unscaled:.4f}, PI x4 after 40 steps {extended:.4f} "
          f"(base at its own length {val_loss(base_ckpt, data, T=BASE_LEN):.4f})")
    assert extended < unscaled


def test_training_free_extension_writes_the_scaled_checkpoint(corpus, base_ckpt):
    path = extend(ExtendConfig(ckpt=base_ckpt, method="yarn", target_len=TARGET_LEN, out_dir=str(corpus / "yarn0")))
    ckpt, base = load_checkpoint(path), load_checkpoint(base_ckpt)
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": BASE_LEN}
    assert ckpt["config"]["model"]["rope_scaling"] == scaling
    assert ckpt["config"]["model"]["block_size"] == TARGET_LEN
    assert ckpt["extension"]["steps"] == 0 and ckpt["extension"]["base_step"] == base["step"] == 5
    for k, v in base["model"].items():  # training-free: the very same weights
        assert torch.equal(ckpt["model"][k], v), k

    # sampling and evaluation load the scaling from the checkpoint; another one needs an explicit override
    model, _ = model_from_checkpoint(path)
    assert model.config.rope_scaling == scaling and model.transformer.pos.scaling == scaling
    other = {"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": BASE_LEN}
    model, _ = model_from_checkpoint(path, override_scaling=other)
    assert model.config.rope_scaling == other

    # a second extension counts from the original length, not from the extended one
    again = extend(ExtendConfig(ckpt=path, method="yarn", target_len=4 * TARGET_LEN, out_dir=str(corpus / "yarn1")))
    assert load_checkpoint(again)["config"]["model"]["rope_scaling"] == {**scaling, "factor": 16.0}


def test_longrope_search_writes_its_factors_into_the_checkpoint(corpus, base_ckpt, capsys):
    path = extend(ExtendConfig(ckpt=base_ckpt, method="longrope", target_len=TARGET_LEN, search=True, search_budget=6,
                               search_docs=2, out_dir=str(corpus / "longrope0")))
    ckpt = load_checkpoint(path)
    scaling, record = ckpt["config"]["model"]["rope_scaling"], ckpt["extension"]["search"]
    assert scaling["rope_type"] == "longrope" and len(scaling["long_factor"]) == 64 // 2 // 2  # 32-dim heads
    assert record["candidates"] == 6 and record["loss"] <= min(record["start_losses"].values())
    model, _ = model_from_checkpoint(path)  # sample, evaluate and export load the searched factors
    assert model.transformer.pos.scaling == scaling
    out = capsys.readouterr().out
    assert "searching LongRoPE factors: 6 candidates, 2 val documents of >= 129 tokens" in out
    assert "LongRoPE searched" in out


def test_too_few_long_documents_falls_back_to_concatenated_documents(corpus, base_ckpt, capsys):
    short = corpus / "short"
    short.mkdir()
    for i in range(40):  # ~60 tokens each: no document holds a 129-token window
        (short / f"doc{i:02d}.txt").write_text(" ".join(f"word{(i * 7 + j) % 50}" for j in range(30)))
    prepare(str(short), corpus / "short_data", val_fraction=0.2, quiet=True)
    path = extend(ExtendConfig(ckpt=base_ckpt, method="linear", factor=4, steps=2, out_dir=str(corpus / "fallback")),
                  dict(data_dir=str(corpus / "short_data"), batch_size=2, eval_iters=1))
    out = capsys.readouterr().out
    assert re.search(r"short_data: 0 of \d+ training documents have >= 129 tokens", out)
    assert "too few long documents" in out and "concatenated documents" in out
    ckpt = load_checkpoint(path)
    assert ckpt["config"]["min_doc_len"] == 0 and ckpt["extension"]["n_long_docs"] == 0


def test_learned_checkpoint_cannot_be_extended(corpus, capsys):
    learned = train_tiny(corpus, "learned", pos_encoding="learned", max_iters=1)
    with pytest.raises(ValueError, match="learned positions cannot be scaled"):
        extend(ExtendConfig(ckpt=learned, method="linear", factor=4, out_dir=str(corpus / "nope")))
    with pytest.raises(SystemExit) as e:  # the command line: one line, no traceback
        cli(extend_context.main, [f"--ckpt={learned}", "--method=yarn", "--factor=4", "--steps=0"])
    assert str(e.value).startswith("error: cannot extend") and "\n" not in str(e.value)
    assert not (corpus / "learned_yarn_x4").exists()  # refused before anything was written


@pytest.mark.parametrize("scheme, method, message", [
    ("alibi", "yarn", "ALiBi needs no scaling"),
    ("none", "yarn", "nothing to scale"),
    ("sinusoidal", "yarn", "sinusoidal positions can only be interpolated"),
    ("learned", "linear", "learned positions cannot be scaled"),
])
def test_schemes_that_cannot_take_the_method_say_why(scheme, method, message):
    cfg = GPTConfig(pos_encoding=scheme)
    scaling, target_len = extend_context.rope_scaling_for(cfg, method, factor=4)
    with pytest.raises(ValueError, match=f"cannot extend ckpt.pt: .*{message}"):
        extend_context.check_extendable(cfg, scaling, target_len, "ckpt.pt")
    scaling, target_len = extend_context.rope_scaling_for(cfg, "linear", factor=4)
    if scheme == "sinusoidal":  # interpolation is what a sinusoidal table can take
        assert extend_context.check_extendable(cfg, scaling, target_len, "ckpt.pt").block_size == 4 * cfg.block_size
    with pytest.raises(ValueError, match="unknown rope_type 'not_a_rope_type'"):
        extend_context.rope_scaling_for(cfg, "not_a_rope_type", factor=4)


def test_factor_and_target_len():
    cfg = GPTConfig(block_size=4096)
    scaling, target = extend_context.rope_scaling_for(cfg, "yarn", target_len=32768)
    assert scaling == {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096}
    assert target == 32768
    scaling, target = extend_context.rope_scaling_for(cfg, "llama3", factor=2.5, params={"high_freq_factor": 8})
    assert target == 10240 and scaling["high_freq_factor"] == 8
    with pytest.raises(ValueError, match="exactly one of --factor or --target_len"):
        extend_context.rope_scaling_for(cfg, "linear", factor=4, target_len=16384)
    with pytest.raises(ValueError, match="factor >= 1"):
        extend_context.rope_scaling_for(cfg, "linear", target_len=1024)
    with pytest.raises(ValueError, match="unknown rope_scaling key"):
        extend_context.rope_scaling_for(cfg, "yarn", factor=4, params={"beta_fats": 16})


@pytest.mark.parametrize("argv, message", [
    (["--method=linear", "--stpes=3"], "unknown config key 'stpes' (did you mean 'steps'?)"),
    (["--method=linear", "--factor=4", "--lerning_rate=1e-3"], "unknown config key 'lerning_rate' (did you mean "
                                                                "'learning_rate'?)"),
    (["--factor=4"], "missing --method"),
    (["--method=linear", "--factor=inf"], "config key 'factor': expected a finite number"),
    (["--method=linear", "--factor=nan"], "config key 'factor': expected a finite number"),
    (["--method=linear", "--factor=0.5"], "config key 'factor': expected a number >= 1"),
    (["--method=linear", "--factor=4", "--block_size=64"], "extend_context.py sets block_size itself"),
    (["--method=linear", "--factor=4", "--batch_size=0"], "config key 'batch_size': expected a number >= 1"),
    (["--method=yarn", "--factor=4", "--search=true"], "give --method=longrope"),
])
def test_command_line_errors_are_one_line(base_ckpt, argv, message):
    with pytest.raises(SystemExit) as e:
        cli(extend_context.main, [f"--ckpt={base_ckpt}", *argv, "--steps=1"])
    assert message in str(e.value) and str(e.value).startswith("error: ") and "\n" not in str(e.value)
