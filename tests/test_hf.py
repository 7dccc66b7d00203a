"""Hugging Face export and import: fp32 logits equal ours, round trips are bit-identical, refusals are one line.

Tiny random models whose weights are scaled up and whose LayerNorm weights and biases are moved away from
identity, so that a wrong mapping (a transposed Conv1D, an unpermuted QKV, a lost bias) shows in the logits.
"""
import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import EXPORT_LEN, error_line
from conftest import random_export_model as random_model

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from model import GPT  # noqa: E402
from posenc.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint  # noqa: E402
from posenc.config import to_dict as config_to_dict  # noqa: E402
from posenc.generation import generate  # noqa: E402
from posenc.positions import permute_rope_layout  # noqa: E402
from posenc.tokenizer import get_tokenizer  # noqa: E402
from scripts import export_hf  # noqa: E402
from scripts import import_hf  # noqa: E402
from train import TrainConfig  # noqa: E402

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
L = EXPORT_LEN  # the original training length of the test models
SCALINGS = {
    "none": None,
    "linear": {"rope_type": "linear", "factor": 4.0, "original_max_position_embeddings": L},
    "ntk": {"rope_type": "ntk", "factor": 4.0, "original_max_position_embeddings": L},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": L},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L, "beta_fast": 16.0},
    "llama3": {"rope_type": "llama3", "factor": 4.0, "original_max_position_embeddings": L, "high_freq_factor": 2.0},
    "direct": {"rope_type": "direct", "factor": 4.0, "original_max_position_embeddings": L},
    "abf": {"rope_type": "abf", "factor": 4.0, "original_max_position_embeddings": L, "base": 5e5},
}
VARIANTS = {  # the defaults, then everything moved off them at once
    "default": {},
    "theta500-partial-interleaved-bias-tanh": dict(rope_theta=500.0, rotary_fraction=0.5, rope_layout="interleaved",
                                                   bias=True, activation="gelu_tanh"),
}
DATA = {"path": "/data/x", "source": "test corpus", "tokens": {"train": 100, "val": 10}, "sha256": {"train.bin": "ab"},
        "tokenizer": "gpt2", "vocab": None}


def logits_diff(model, hf, T, seed=0):
    idx = torch.randint(0, 50257, (1, T), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return (model(idx)[0] - hf(idx).logits).abs().max().item()


def write_ckpt(model, path, data=DATA, **extra):
    ckpt = {"model": model.state_dict(), "config": config_to_dict(TrainConfig(model=model.config)), "step": 42,
            "optimizer": None, "data": data, "best_val_loss": 3.25, "format_version": FORMAT_VERSION,
            **extra}
    return save_checkpoint(ckpt, path)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rope_type", SCALINGS)
def test_rope_exports_to_gpt_neox_with_our_logits(rope_type, variant):
    model = random_model(SCALINGS[rope_type], **VARIANTS[variant])
    hf = export_hf.to_hf(model)
    assert type(hf).__name__ == "GPTNeoXForCausalLM"
    for T in (L, 4 * model.config.block_size):  # growing lengths: dynamic NTK stays fresh (see below)
        assert logits_diff(model, hf, T) < 1e-4, (rope_type, variant, T)


@pytest.mark.parametrize("bias, activation", [(False, "gelu"), (True, "gelu"), (True, "gelu_tanh")])
def test_learned_exports_to_gpt2_with_our_logits(bias, activation):
    model = random_model(pos_encoding="learned", bias=bias, activation=activation)
    hf = export_hf.to_hf(model)
    assert type(hf).__name__ == "GPT2LMHeadModel"
    assert hf.config.activation_function == {"gelu": "gelu", "gelu_tanh": "gelu_new"}[activation]
    assert logits_diff(model, hf, L) < 1e-4


@pytest.mark.parametrize("act", ["gelu_new", "gelu_pytorch_tanh", "gelu_fast"])
def test_gpt2_style_tanh_gelu_imports_as_gelu_tanh(act, tmp_path):
    """GPT-2's own checkpoints use the tanh GELU ('gelu_new'; 'gelu_pytorch_tanh', 'gelu_fast' compute it too): a plain
    transformers GPT-2 folder, without our record, imports as activation="gelu_tanh" with its logits."""
    config = transformers.GPT2Config(vocab_size=50304, n_embd=32, n_layer=2, n_head=4, n_positions=L,
                                     activation_function=act)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "hf")
    import_hf.main([f"--hf_dir={tmp_path / 'hf'}", f"--out_dir={tmp_path / 'out'}"])
    ckpt = load_checkpoint(tmp_path / "out" / "ckpt.pt")
    assert ckpt["config"]["model"]["activation"] == "gelu_tanh"
    ours, _ = import_hf.from_hf(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert logits_diff(ours, hf, L) < 1e-4


def test_parity_check_sees_small_mapping_errors():
    """The comparison above is sharp: a 1% change of θ, or the other RoPE pairing, shows far above 1e-4."""
    model = random_model(rope_theta=500.0, rope_layout="interleaved")
    hf = export_hf.to_hf(model)
    for change in (dict(rope_theta=505.0), dict(rope_layout="half")):
        other = GPT(dataclasses.replace(model.config, **change)).eval()
        other.load_state_dict(model.state_dict())
        assert logits_diff(other, hf, 4 * L) > 1e-3, change


def test_dynamic_ntk_frequencies_go_stale_in_one_transformers_instance():
    """transformers recomputes dynamic NTK frequencies only when the input grows: after 4L, a 2L input keeps
    4L's frequencies. Ours are recomputed per length, so only a fresh instance matches at 2L."""
    model = random_model(SCALINGS["dynamic"])
    hf = export_hf.to_hf(model)
    logits_diff(model, hf, 4 * model.config.block_size)
    assert logits_diff(model, hf, 2 * L) > 1e-3  # stale
    assert logits_diff(model, export_hf.to_hf(model), 2 * L) < 1e-4  # fresh


@pytest.mark.parametrize("kind", ["ntk-interleaved-bias", "dynamic", "yarn-partial", "learned"])
def test_export_import_round_trip_is_bit_identical(kind, tmp_path):
    changed = VARIANTS["theta500-partial-interleaved-bias-tanh"]
    model = {"ntk-interleaved-bias": lambda: random_model(SCALINGS["ntk"], **changed),
             "dynamic": lambda: random_model(SCALINGS["dynamic"]),
             "yarn-partial": lambda: random_model(SCALINGS["yarn"], rotary_fraction=0.5, rope_theta=2e5),
             "learned": lambda: random_model(pos_encoding="learned", bias=True)}[kind]()
    src = write_ckpt(model, tmp_path / "ckpt.pt")
    export_hf.main([f"--ckpt={src}", f"--out_dir={tmp_path / 'hf'}"])
    import_hf.main([f"--hf_dir={tmp_path / 'hf'}", f"--out_dir={tmp_path / 'back'}"])
    before, after = load_checkpoint(src), load_checkpoint(tmp_path / "back" / "ckpt.pt")
    assert after["config"] == before["config"]
    assert after["model"].keys() == before["model"].keys()
    for k, w in before["model"].items():
        assert torch.equal(after["model"][k], w), k
    assert after["step"] == 42 and after["data"] == {k: v for k, v in DATA.items() if k != "path"}


@pytest.mark.parametrize("rope_type", ["abf", "direct"])
def test_abf_and_direct_export_as_the_default_rope_type_and_round_trip(rope_type, tmp_path):
    """Plain RoPE with a new base (ABF) or the old one (direct) is the default rope type with that base: the
    round trip through our record is bit-identical, and the transformers config alone gives the same logits."""
    model = random_model(SCALINGS[rope_type], rope_theta=500.0)
    base = SCALINGS[rope_type].get("base", 500.0)
    src = write_ckpt(model, tmp_path / "ckpt.pt")
    export_hf.main([f"--ckpt={src}", f"--out_dir={tmp_path / 'hf'}"])
    params = json.loads((tmp_path / "hf" / "config.json").read_text())["rope_parameters"]
    assert params["rope_type"] == "default" and params["rope_theta"] == pytest.approx(base, rel=1e-12)
    import_hf.main([f"--hf_dir={tmp_path / 'hf'}", f"--out_dir={tmp_path / 'back'}"])
    before, after = load_checkpoint(src), load_checkpoint(tmp_path / "back" / "ckpt.pt")
    assert after["config"] == before["config"]
    for k, w in before["model"].items():
        assert torch.equal(after["model"][k], w), k
    hf = export_hf.to_hf(model)
    hf.save_pretrained(tmp_path / "plain")  # no record of ours: what transformers alone says
    derived, record = import_hf.from_hf(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "plain"))
    assert record == {} and derived.config.rope_scaling is None
    assert derived.config.rope_theta == pytest.approx(base, rel=1e-12)
    assert logits_diff(model, export_hf.to_hf(derived), 4 * L) < 1e-4


def test_import_without_our_record_uses_the_transformers_config(tmp_path):
    """A plain GPT-NeoX folder (no "posenc" record): half pairing, NTK as its base, the same logits."""
    model = random_model(SCALINGS["ntk"], **VARIANTS["theta500-partial-interleaved-bias-tanh"])
    hf = export_hf.to_hf(model)
    hf.save_pretrained(tmp_path / "hf")
    model2, record = import_hf.from_hf(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf"))
    c = model2.config
    assert record == {} and c.rope_layout == "half" and c.rope_scaling is None and c.block_size == 4 * L
    assert c.rope_theta == pytest.approx(500.0 * 4 ** (4 / 2))  # b * s^(d/(d-2)), d = 8 * 0.5 rotated dims
    half = permute_rope_layout(model.state_dict(), model.config, "half")
    assert all(torch.equal(w, half[k]) for k, w in model2.state_dict().items())
    assert logits_diff(model, export_hf.to_hf(model2), 4 * c.block_size) < 1e-4


def test_exported_folder_loads_and_generates_offline(tmp_path):
    """HF_HUB_OFFLINE=1 in a fresh process: AutoModel and AutoTokenizer load; the tokenizer is GPT-2's; greedy
    generate (transformers' KV cache) gives our tokens; the model card names what a user needs."""
    model = random_model(SCALINGS["yarn"], rope_theta=500.0)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.md").write_text("| model | ppl |\n|---|---|\n| rope | 12.5 |\n![ppl](ppl.png)\n")
    src = write_ckpt(model, tmp_path / "run" / "ckpt.pt")
    export_hf.export(src, tmp_path / "hf")
    text = "def f(x):\n    return x ** 2  # héllo 🙂\n"
    code = ("import json, sys, transformers\n"
            f"tok = transformers.AutoTokenizer.from_pretrained({str(tmp_path / 'hf')!r})\n"
            f"m = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / 'hf')!r})\n"
            f"ids = tok({text!r}, return_tensors='pt').input_ids\n"
            "out = m.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)\n"
            "print(json.dumps([ids[0].tolist(), out[0].tolist()]))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    ids, out = json.loads(run.stdout.strip().splitlines()[-1])
    assert ids == get_tokenizer().encode_ordinary(text)
    ours = generate(model, torch.tensor([ids]), 12, temperature=0)
    assert out == ours[0].tolist()
    card = (tmp_path / "hf" / "README.md").read_text()
    for fact in ("GPTNeoXForCausalLM", "rope", "θ=500", f"training length: {L} tokens", "'rope_type': 'yarn'",
                 "test corpus", "42 steps", "| rope | 12.5 |"):
        assert fact in card, fact
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "/data/x" not in json.dumps(config) and "ppl.png" not in card
    # both forms of the RoPE settings: transformers 4.x ignores rope_parameters, 5.x reads either
    assert config["rope_parameters"]["rope_theta"] == config["rotary_emb_base"] == 500.0
    assert config["rope_scaling"]["rope_type"] == config["rope_parameters"]["rope_type"] == "yarn"


@pytest.mark.parametrize("scheme, words", [("sinusoidal", "sinusoidal"), ("none", "NoPE"),
                                           ("alibi", "before the 1/sqrt(head_dim)"), ("compact", "--vocab_size")])
def test_export_refuses_in_one_line(scheme, words, tmp_path):
    model = random_model(pos_encoding="rope" if scheme == "compact" else scheme)
    data = {**DATA, "vocab": {"size": 8192, "ids": list(range(8191))}} if scheme == "compact" else DATA
    src = write_ckpt(model, tmp_path / "ckpt.pt", data=data)
    assert words in error_line(export_hf.main, [f"--ckpt={src}", f"--out_dir={tmp_path / 'hf'}"])
    assert not (tmp_path / "hf").exists()


def test_missing_transformers_is_one_line(tmp_path, monkeypatch):
    src = write_ckpt(random_model(), tmp_path / "ckpt.pt")
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    assert "pip install transformers" in error_line(export_hf.main, [f"--ckpt={src}", f"--out_dir={tmp_path / 'a'}"])
    assert "pip install transformers" in error_line(import_hf.main, [f"--hf_dir={tmp_path}", f"--out_dir={tmp_path}"])


NEOX = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128,
            hidden_act="gelu", use_parallel_residual=False, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 1.0})


@pytest.mark.parametrize("change, words", [
    (dict(use_parallel_residual=True), "parallel residual"),
    (dict(hidden_act="relu"), "its activation is 'relu'; ours is GELU"),
    (dict(tie_word_embeddings=False), "not tied"),
    (dict(layer_norm_eps=1e-6), "LayerNorm eps"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 8,
                           "mscale": 0.7, "mscale_all_dim": 0.7}), "mscale"),
    ("gpt2", "'quick_gelu'"),
    ("vocab", "not GPT-2's"),
])
def test_import_refuses_in_one_line(change, words, tmp_path):
    if change == "gpt2":  # another function: x sigmoid(1.702 x)
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4,
                                                                  activation_function="quick_gelu"))
    else:
        config = transformers.GPTNeoXConfig(**{**NEOX, **(change if change != "vocab" else {})})
        hf = transformers.GPTNeoXForCausalLM(config)
    hf.save_pretrained(tmp_path / "hf")
    if change == "vocab":
        (tmp_path / "hf" / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    assert words in error_line(import_hf.main, [f"--hf_dir={tmp_path / 'hf'}", f"--out_dir={tmp_path / 'out'}"])


def test_alibi_has_no_exact_transformers_architecture():
    """What the ALiBi refusal says, measured: Falcon (alibi, sequential, old architecture) is our model with
    slopes m/sqrt(head_dim); BLOOM is our model with a LayerNorm on the token embeddings and tanh GELU (our
    activation="gelu_tanh"): the LayerNorm is what no setting of ours gives."""
    model = random_model(pos_encoding="alibi", bias=True)
    c, sd = model.config, model.state_dict()
    nh, hs = c.n_head, c.n_embd // c.n_head
    names = {"ln_1": "input_layernorm", "attn.c_attn": "self_attention.query_key_value",
             "ln_2": "post_attention_layernorm", "attn.c_proj": "self_attention.dense",
             "mlp.c_fc": "mlp.dense_h_to_4h", "mlp.c_proj": "mlp.dense_4h_to_h"}
    state = {"transformer.word_embeddings.weight": sd["transformer.wte.weight"], "lm_head.weight": sd["lm_head.weight"],
             **{f"transformer.ln_f.{p}": sd[f"transformer.ln_f.{p}"] for p in ("weight", "bias")},
             "transformer.word_embeddings_layernorm.weight": torch.ones(c.n_embd),
             "transformer.word_embeddings_layernorm.bias": torch.zeros(c.n_embd)}
    for i in range(c.n_layer):
        for ours, theirs in names.items():
            for p in ("weight", "bias"):
                w = sd[f"transformer.h.{i}.{ours}.{p}"]
                if ours == "attn.c_attn":  # per head [q_h, k_h, v_h], as GPT-NeoX
                    w = w.reshape(3, nh, hs, *w.shape[1:]).transpose(0, 1).reshape(w.shape)
                state[f"transformer.h.{i}.{theirs}.{p}"] = w
    common = dict(vocab_size=c.vocab_size, hidden_size=c.n_embd, layer_norm_epsilon=1e-5, tie_word_embeddings=True)
    falcon = transformers.FalconForCausalLM(transformers.FalconConfig(
        num_hidden_layers=c.n_layer, num_attention_heads=nh, alibi=True, parallel_attn=False, bias=True,
        new_decoder_architecture=False, multi_query=False, activation="gelu", ffn_hidden_size=4 * c.n_embd,
        **common)).eval()
    bloom = transformers.BloomForCausalLM(transformers.BloomConfig(n_layer=c.n_layer, n_head=nh, **common)).eval()
    for hf in (falcon, bloom):
        hf.load_state_dict({k: v for k, v in state.items() if k in hf.state_dict()}, strict=True)
        assert logits_diff(model, hf, 4 * L) > 1e-2, type(hf).__name__  # not our model

    pos = model.transformer.pos
    pos.slopes = pos.slopes / math.sqrt(hs)  # Falcon adds the bias before the 1/sqrt(head_dim) scaling
    assert logits_diff(model, falcon, 4 * L) < 1e-4  # (lengths <= 256: its bias is built in bfloat16)
    pos.slopes = pos.slopes * math.sqrt(hs)
    wte, ln = model.transformer.wte, torch.nn.LayerNorm(c.n_embd)
    model.transformer.wte = torch.nn.Sequential(wte, ln)  # BLOOM's word_embeddings_layernorm (input side only)
    for block in model.transformer.h:
        block.mlp.gelu = torch.nn.GELU(approximate="tanh")  # BLOOM's GELU
    assert logits_diff(model, bloom, 4 * L) < 1e-4


def test_an_export_or_import_never_replaces_an_earlier_one_unasked(tmp_path):
    src = write_ckpt(random_model(), tmp_path / "ckpt.pt")
    export_hf.main([f"--ckpt={src}", f"--out_dir={tmp_path / 'hf'}"])
    import_hf.main([f"--hf_dir={tmp_path / 'hf'}", f"--out_dir={tmp_path / 'back'}"])
    before = {p: p.read_bytes() for folder in ("hf", "back") for p in (tmp_path / folder).iterdir()}
    assert "holds an earlier export" in error_line(export_hf.main, [f"--ckpt={src}", f"--out_dir={tmp_path / 'hf'}"])
    assert "holds an earlier run" in error_line(import_hf.main, [f"--hf_dir={tmp_path / 'hf'}",
                                                                 f"--out_dir={tmp_path / 'back'}"])
    assert {p: p.read_bytes() for folder in ("hf", "back") for p in (tmp_path / folder).iterdir()} == before
    assert "give --ckpt and --out_dir" in error_line(export_hf.main, [f"--ckpt={src}"])
    assert "no transformers model at" in error_line(import_hf.main, [f"--hf_dir={tmp_path}/none", "--out_dir=x"])
    export_hf.main([f"--ckpt={src}", f"--out_dir={tmp_path / 'hf'}", "--overwrite=true"])  # when asked: fine


# ----------------------------------------------------------------------- LongRoPE and proportional (p-RoPE)

LONGROPE = {"rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": L,
            "short_factor": [1.0, 1.2, 1.5, 2.0], "long_factor": [1.0, 2.0, 5.0, 9.0]}  # 8 rotated dims: 4 pairs
PROPORTIONAL = {"rope_type": "proportional", "factor": 2.0, "partial_rotary_factor": 0.5}
NEW_TYPES = {
    "longrope": lambda: random_model(LONGROPE),
    "longrope-defaults-partial-interleaved": lambda: random_model(  # short 1, long = factor; 2 pairs
        {k: v for k, v in LONGROPE.items() if not k.endswith("_factor")}, rotary_fraction=0.5,
        rope_layout="interleaved", rope_theta=500.0),
    "proportional": lambda: random_model(PROPORTIONAL, rope_layout="interleaved", bias=True),
}


@pytest.mark.parametrize("kind", NEW_TYPES)
def test_longrope_and_proportional_export_with_our_logits_at_L_and_4L(kind):
    model = NEW_TYPES[kind]()
    hf = export_hf.to_hf(model)
    assert hf.config.rope_parameters["rope_type"] == kind.partition("-")[0]
    for T in (L, 4 * L, L + 1, L):  # both sides of LongRoPE's switch, and back: it switches per input
        assert logits_diff(model, hf, T) < 1e-4, (kind, T)


@pytest.mark.parametrize("kind", NEW_TYPES)
def test_longrope_and_proportional_round_trip_is_bit_identical(kind, tmp_path):
    model = NEW_TYPES[kind]()
    src = write_ckpt(model, tmp_path / "ckpt.pt")
    export_hf.main([f"--ckpt={src}", f"--out_dir={tmp_path / 'hf'}"])
    import_hf.main([f"--hf_dir={tmp_path / 'hf'}", f"--out_dir={tmp_path / 'back'}"])
    before, after = load_checkpoint(src), load_checkpoint(tmp_path / "back" / "ckpt.pt")
    assert after["config"] == before["config"]
    for k, w in before["model"].items():
        assert torch.equal(after["model"][k], w), k


def test_plain_longrope_and_proportional_folders_import_with_transformers_defaults(tmp_path):
    """Without our record: LongRoPE's factor from max_position_embeddings / original (Phi-3's way), p-RoPE's
    fraction in rope_scaling and the whole head rotated."""
    cases = {"longrope": ({k: v for k, v in LONGROPE.items() if k != "factor"}, 4 * L),
             "proportional": ({"rope_type": "proportional", "partial_rotary_factor": 0.25}, L)}
    for kind, (params, max_len) in cases.items():
        config = transformers.GPTNeoXConfig(**{**NEOX, "max_position_embeddings": max_len, "rope_parameters": {
            "rope_theta": 1e4, "partial_rotary_factor": 1.0, **params}})
        hf = transformers.GPTNeoXForCausalLM(config).eval()
        hf.save_pretrained(tmp_path / kind)
        model, _ = import_hf.from_hf(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / kind))
        c = model.config
        assert c.rope_scaling["rope_type"] == kind and c.rotary_fraction == 1.0 and c.block_size == max_len
        if kind == "longrope":
            assert c.rope_scaling["factor"] == 4.0 and c.rope_scaling["long_factor"] == LONGROPE["long_factor"]
        else:
            assert c.rope_scaling == {"rope_type": "proportional", "partial_rotary_factor": 0.25, "factor": 1.0}
        for T in (L, 4 * L):
            idx = torch.randint(0, 64, (1, T))
            with torch.no_grad():
                assert (model(idx)[0] - hf(idx).logits).abs().max() < 1e-4, (kind, T)


@torch.no_grad()
def test_transformers_cache_keeps_short_factor_keys_past_the_longrope_switch():
    """What the README says: transformers' full forward switches exactly, but its KV cache keeps the keys it
    rotated with the short factors, so cached decoding past the original length drifts from the full forward
    (ours recomputes them: tests/test_rope_types.py)."""
    model = random_model(LONGROPE)
    hf = export_hf.to_hf(model)
    idx = torch.randint(0, 50257, (1, L + 4), generator=torch.Generator().manual_seed(0))
    out = hf(idx[:, :L - 2], use_cache=True)
    drift = []
    for t in range(L - 2, L + 4):
        out = hf(idx[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
        drift.append((out.logits[:, -1] - model(idx[:, :t + 1])[0][:, -1]).abs().max().item())
    assert max(drift[:2]) < 1e-4  # up to the original length: exact
    assert min(drift[2:]) > 1e-2, drift  # past it: stale keys
