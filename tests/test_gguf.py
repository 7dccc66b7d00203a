"""GGUF export: the file read back with gguf's own reader holds every tensor and key the mapping promises, the
rope keys give llama.cpp's formula our frequencies, refusals are one line; and, where llama-cpp-python is
installed, llama.cpp's logits equal ours (skipped otherwise: CI does not build llama.cpp).

Tiny random models with weights scaled up and LayerNorms moved off identity (as in test_hf.py), so that a lost
bias, a transposed matrix or an unpermuted pairing shows.
"""
import dataclasses
import math

import numpy as np
import pytest
import torch
from conftest import EXPORT_LEN, error_line
from conftest import random_export_model as random_model

gguf = pytest.importorskip("gguf")

from model import GPT  # noqa: E402
from posenc.checkpoint import FORMAT_VERSION, save_checkpoint  # noqa: E402
from posenc.config import to_dict as config_to_dict  # noqa: E402
from posenc.positions import RoPE, alibi_slopes, permute_rope_layout  # noqa: E402
from posenc.rope_scaling import rope_frequencies  # noqa: E402
from posenc.tokenizer import EOT, get_tokenizer  # noqa: E402
from scripts import export_gguf  # noqa: E402
from train import TrainConfig  # noqa: E402

L = EXPORT_LEN  # the original training length of the test models
SCALINGS = {
    "none": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "ntk": {"rope_type": "ntk", "factor": 4.0, "original_max_position_embeddings": L},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L},
    "yarn-attention": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": L,
                       "attention_factor": 1.5},
}
CHANGED = dict(rope_theta=500.0, rotary_fraction=0.5, rope_layout="interleaved", bias=True)
DATA = {"source": "test corpus", "tokens": {"train": 100, "val": 10}, "vocab": None}


def write_ckpt(model, path, data=DATA):
    ckpt = {"model": model.state_dict(), "config": config_to_dict(TrainConfig(model=model.config)), "step": 7,
            "optimizer": None, "data": data, "best_val_loss": 3.0, "format_version": FORMAT_VERSION}
    return save_checkpoint(ckpt, path)


def read(path):
    """(fields {key: value}, tensors {name: (ggml shape, float32 values in numpy order, ggml type name)})."""
    r = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (tuple(int(n) for n in t.shape), gguf.quants.dequantize(t.data, t.tensor_type),
                        t.tensor_type.name) for t in r.tensors}
    return fields, tensors


def expected_tensors(model):
    """Our state dict as the mapping promises it, written out here by hand: half pairing, zeros for absent biases."""
    c = model.config
    sd = model.state_dict()
    if c.pos_encoding == "rope" and c.rope_layout == "interleaved":
        sd = permute_rope_layout(sd, c, "half")
    zeros = lambda n: torch.zeros(n)  # noqa: E731
    out = {"token_embd.weight": sd["transformer.wte.weight"], "output.weight": sd["lm_head.weight"],
           "output_norm.weight": sd["transformer.ln_f.weight"],
           "output_norm.bias": sd.get("transformer.ln_f.bias", zeros(c.n_embd))}
    if c.pos_encoding == "learned":
        out["position_embd.weight"] = sd["transformer.pos.wpe.weight"]
    names = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
             "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    for i in range(c.n_layer):
        for ours, theirs in names.items():
            w = sd[f"transformer.h.{i}.{ours}.weight"]
            out[f"blk.{i}.{theirs}.weight"] = w
            out[f"blk.{i}.{theirs}.bias"] = sd.get(f"transformer.h.{i}.{ours}.bias", zeros(w.shape[0]))
    return {k: v.float().numpy() for k, v in out.items()}


@pytest.fixture
def without_tokenizer(monkeypatch):
    """Files without the tokenizer's 150k strings, which gguf's reader takes seconds to parse: for the tests of
    tensors and model keys (the tokenizer has its own, below)."""
    monkeypatch.setattr(export_gguf, "tokenizer_metadata", lambda vocab_size: {})


# ----------------------------------------------------------------------------- tensors

# the largest error each dtype's rounding allows, relative to a tensor's largest value: f16 rounds to 11 bits,
# bf16 to 8; q8_0 stores q * d per block of 32 with d = block max / 127 in fp16: half a step of d, plus up to 127
# times d's own rounding (2^-11 of d)
ROUNDING = {"f32": 0.0, "f16": 2.0 ** -11, "bf16": 2.0 ** -8, "q8_0": (0.5 + 127 * 2.0 ** -11) / 127}


@pytest.mark.parametrize("dtype, variant", [*((d, "default") for d in ROUNDING), ("f32", "changed"),
                                            ("q8_0", "changed"), ("f32", "learned")])
def test_every_tensor_reads_back_with_its_name_shape_and_values(dtype, variant, tmp_path, without_tokenizer):
    kw = {"default": {}, "changed": CHANGED, "learned": dict(pos_encoding="learned", bias=True)}[variant]
    model = random_model(**kw)
    export_gguf.write_gguf(model, tmp_path / "m.gguf", dtype)
    _, tensors = read(tmp_path / "m.gguf")
    expected = expected_tensors(model)
    assert tensors.keys() == expected.keys()
    for name, want in expected.items():
        shape, got, kind = tensors[name]
        assert shape == tuple(reversed(want.shape)), name  # ggml lists dims innermost first
        got = got.reshape(want.shape)
        if want.ndim == 1 or dtype == "f32":  # vectors are always f32, and f32 is exact
            assert kind == "F32" and np.array_equal(got, want), name
        else:
            assert kind == dtype.upper(), name
            assert np.abs(got - want).max() <= ROUNDING[dtype] * np.abs(want).max(), name


def test_tied_head_and_absent_biases():
    """gptneox needs output.weight and every bias: the tied embedding is written twice, absent biases as zeros."""
    model = random_model()
    tensors = export_gguf.gguf_tensors(model)
    assert np.array_equal(tensors["output.weight"], tensors["token_embd.weight"])
    assert not np.any(tensors["blk.1.attn_qkv.bias"]) and tensors["blk.1.attn_qkv.bias"].shape == (96,)


# ----------------------------------------------------------------------------- metadata

@pytest.mark.parametrize("rope_type", SCALINGS)
def test_every_key_holds_the_checkpoint_config(rope_type, tmp_path, without_tokenizer):
    s = SCALINGS[rope_type]
    model = random_model(s, rope_theta=500.0, rotary_fraction=0.5)
    (tmp_path / "run").mkdir()
    src = write_ckpt(model, tmp_path / "run" / "ckpt.pt")
    export_gguf.main([f"--ckpt={src}", f"--out={tmp_path / 'm.gguf'}", "--dtype=f16"])
    fields, _ = read(tmp_path / "m.gguf")
    c, a = model.config, "gptneox."
    want = {"general.architecture": "gptneox", "general.name": "run", "general.file_type": 1,  # MOSTLY_F16
            a + "context_length": c.block_size, a + "embedding_length": 32, a + "block_count": 2,
            a + "feed_forward_length": 128, a + "attention.head_count": 4,
            a + "attention.layer_norm_epsilon": 1e-5, a + "use_parallel_residual": False,
            a + "rope.dimension_count": 4,  # head 8 x rotary fraction 0.5
            a + "rope.freq_base": 500.0, a + "rope.scaling.type": "none"}
    if rope_type == "linear":
        want |= {a + "rope.scaling.type": "linear", a + "rope.scaling.factor": 4.0}
    if rope_type == "ntk":
        want[a + "rope.freq_base"] = 500.0 * 4.0 ** (4 / 2)  # b * s^(d/(d-2)), d = 4 rotated dims
    if rope_type.startswith("yarn"):  # llama.cpp multiplies cos/sin by attn_factor * (1 + 0.1 ln s)
        attn = s.get("attention_factor", 1 + 0.1 * math.log(s["factor"])) / (1 + 0.1 * math.log(s["factor"]))
        want |= {a + "rope.scaling.type": "yarn", a + "rope.scaling.factor": s["factor"],
                 a + "rope.scaling.original_context_length": L, a + "rope.scaling.attn_factor": attn}
    assert fields.keys() == want.keys()
    for key, value in want.items():
        got = fields[key]
        assert (got == pytest.approx(value, rel=1e-6) if isinstance(value, float) else got == value), key


@pytest.mark.parametrize("scheme", ["alibi", "none"])
def test_mpt_keys_hold_the_checkpoint_config(scheme, tmp_path, without_tokenizer):
    """ALiBi and none go to llama.cpp's mpt: its sizes, and max_alibi_bias only for ALiBi (none: no positions)."""
    model = random_model(pos_encoding=scheme, n_head=2)
    export_gguf.write_gguf(model, tmp_path / "m.gguf")
    fields, tensors = read(tmp_path / "m.gguf")
    a = "mpt."
    want = {"general.architecture": "mpt", "general.file_type": 0, a + "context_length": L, a + "embedding_length": 32,
            a + "block_count": 2, a + "feed_forward_length": 128, a + "attention.head_count": 2,
            a + "attention.layer_norm_epsilon": 1e-5, **({a + "attention.max_alibi_bias": 8.0} if scheme == "alibi"
                                                          else {})}
    assert {k: v for k, v in fields.items() if not k.startswith("tokenizer.")} == pytest.approx(want)
    assert tensors.keys() == expected_tensors(model).keys()


@pytest.mark.parametrize("n_head", [1, 2, 3, 4, 6, 8, 12, 16, 20])
def test_llama_cpp_alibi_slopes_are_ours(n_head):
    """llama.cpp's slopes from max_alibi_bias 8 (m0^(h+1), then odd powers of m1 past the largest power of two)
    equal the ALiBi paper's, which ours are (positions.alibi_slopes), for powers of two and the rest."""
    assert export_gguf.llama_cpp_alibi_slopes(n_head, 8.0) == pytest.approx(alibi_slopes(n_head), rel=1e-12)


@pytest.mark.parametrize("rope_type", SCALINGS)
def test_llama_cpp_formula_gives_our_frequencies(rope_type):
    config = random_model(SCALINGS[rope_type], rope_theta=500.0, rotary_fraction=0.5).config
    d = RoPE.rotated_dim(config)
    theirs, mscale = export_gguf.llama_cpp_frequencies(d, export_gguf.rope_metadata(config))
    ours, attention_factor = rope_frequencies(d, config.rope_theta, config.rope_scaling)
    torch.testing.assert_close(theirs, ours, rtol=1e-12, atol=0)
    assert mscale == pytest.approx(attention_factor, rel=1e-12)


def test_llama_cpp_yarn_formula_matches_the_reference_values():
    """ggml's YaRN, as written in llama_cpp_frequencies, against transformers' published values (docs/references.md:
    d=64, b=1e4, factor 4, L=4096): the emulation is checked on its own, not only against our formula."""
    meta = {"gptneox.rope.freq_base": 1e4, "gptneox.rope.scaling.type": "yarn", "gptneox.rope.scaling.factor": 4.0,
            "gptneox.rope.scaling.original_context_length": 4096}
    inv_freq, mscale = export_gguf.llama_cpp_frequencies(64, meta)
    want = {0: 1.0, 8: 1e-1, 16: 6.538462e-03, 24: 2.5e-04, 31: 3.333804e-05}
    for i, v in want.items():
        assert inv_freq[i].item() == pytest.approx(v, rel=1e-6), i
    assert mscale == pytest.approx(1.138629, rel=1e-6)


def gpt2_byte_chars():
    """GPT-2's byte -> printable character map (its encoder.py): printable Latin-1 bytes stand for themselves, the
    others for chr(256 + n) in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    others = [b for b in range(256) if b not in kept]
    return {b: chr(b) for b in kept} | {b: chr(256 + n) for n, b in enumerate(others)}


def test_tokenizer_keys_are_gpt2_bpe():
    """Every token string is the byte-level form of tiktoken's bytes for that id; types and merges as llama.cpp's
    gpt2 tokenizer reads them."""
    meta = export_gguf.tokenizer_metadata(50304)
    tokens, types, merges = (meta[f"tokenizer.ggml.{k}"] for k in ("tokens", "token_type", "merges"))
    enc, chars = get_tokenizer(), gpt2_byte_chars()
    assert len(tokens) == len(types) == 50304 and len(merges) == 50000  # GPT-2's 50k merges
    for i in range(EOT):
        assert tokens[i] == "".join(chars[b] for b in enc.decode_single_token_bytes(i)), i
    assert tokens[EOT] == "<|endoftext|>" and types[EOT] == int(gguf.TokenType.CONTROL)
    assert set(types[:EOT]) == {int(gguf.TokenType.NORMAL)} and set(types[EOT + 1:]) == {int(gguf.TokenType.UNUSED)}
    assert merges[0] == "\u0120 t" and meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"


def test_tokenizer_keys_read_back(tmp_path):
    model = random_model()
    export_gguf.write_gguf(model, tmp_path / "m.gguf")
    fields, _ = read(tmp_path / "m.gguf")
    for key, value in export_gguf.tokenizer_metadata(model.config.vocab_size).items():
        assert fields[key] == value, key


# ----------------------------------------------------------------------------- refusals

REFUSED = {  # case: (rope_scaling, other config, words the one line must hold)
    "sinusoidal": (None, dict(pos_encoding="sinusoidal"), "no architecture"),
    "t5": (None, dict(pos_encoding="t5"), "no architecture mapped"),
    "dynamic": ({"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": L}, {}, "--rope-freq-base"),
    "llama3": ({"rope_type": "llama3", "factor": 4.0, "original_max_position_embeddings": L}, {}, "rope_freqs"),
    "yarn-beta": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L, "beta_fast": 16.0}, {},
                  "--yarn-beta-fast 16"),
    "yarn-truncate": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L, "truncate": False},
                      {}, "truncate"),
    "q8_0-width": (None, dict(n_embd=48), "multiple of 32"),
    "compact": (None, {}, "--vocab_size"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_export_refuses_in_one_line(case, tmp_path):
    scaling, kw, words = REFUSED[case]
    model = random_model(scaling, **kw)
    data = {**DATA, "vocab": {"size": 8192, "ids": list(range(8191))}} if case == "compact" else DATA
    src = write_ckpt(model, tmp_path / "ckpt.pt", data=data)
    argv = [f"--ckpt={src}", f"--out={tmp_path / 'm.gguf'}"] + (["--dtype=q8_0"] if case == "q8_0-width" else [])
    assert words in error_line(export_gguf.main, argv)
    assert not list(tmp_path.glob("m.gguf*"))  # nothing written, not even a partial file


def test_existing_file_is_kept_without_overwrite(tmp_path):
    src = write_ckpt(random_model(), tmp_path / "ckpt.pt")
    (tmp_path / "m.gguf").write_text("keep")
    assert "--overwrite" in error_line(export_gguf.main, [f"--ckpt={src}", f"--out={tmp_path / 'm.gguf'}"])
    assert (tmp_path / "m.gguf").read_text() == "keep"


# ----------------------------------------------------------------------------- llama.cpp itself

def test_ggml_gelu_is_the_tanh_approximation_through_fp16():
    """Our emulation of llama.cpp's activation is the tanh GELU (activation="gelu_tanh") up to the fp16 table's
    two roundings, of x and of the entry (2^-11 relative each; the function's slope is at most 1.13), and differs
    from exact GELU by more than that: this is what remains between llama.cpp's logits and an exact-GELU model's."""
    x = torch.linspace(-12, 12, 100001)
    exact, tanh, ggml = (torch.nn.functional.gelu(x), torch.nn.functional.gelu(x, approximate="tanh"),
                         export_gguf.ggml_gelu(x))
    assert ((ggml - tanh).abs() <= 2.13 * 2.0 ** -11 * x.abs() + 1e-7).all()
    assert (ggml - exact).abs().max() < 1e-2 and (ggml - exact).abs().max() > 1e-4
    assert torch.equal(ggml[x >= 10], x[x >= 10]) and not ggml[x <= -10].any()


def test_only_an_exact_gelu_export_carries_a_note(tmp_path, capsys):
    for activation, noted in (("gelu", True), ("gelu_tanh", False)):
        (tmp_path / activation).mkdir()
        src = write_ckpt(random_model(activation=activation), tmp_path / activation / "ckpt.pt")
        export_gguf.main([f"--ckpt={src}", f"--out={tmp_path / activation / 'm.gguf'}"])
        assert ("--activation=gelu_tanh" in capsys.readouterr().err) == noted, activation


# llama.cpp against our model with its GELU (export_gguf.ggml_gelu), relative to the largest logit, two ways:
# - MAPPING_TOL with the MLPs' output zeroed (without_mlp): embeddings, norms, attention, positions and head alone,
#   which differ only in f32 summation order (measured: up to 3e-7 for rope, learned, alibi and none; θ 1% off
#   gives 7e-5);
# - WHOLE_TOL for the whole model: the GELU table has steps of 2^-11, so that f32 noise on its inputs moves some
#   entries one step. On these scaled-up weights, 3e-7 of random noise on our GELU inputs moved the logits by up to
#   3.3e-4, and llama.cpp differs by up to 2.9e-4. A gelu_tanh model as it is (no table) differs by up to 4.4e-4.
MAPPING_TOL = 3e-6
WHOLE_TOL = 1e-3
ALIBI = dict(pos_encoding="alibi", bias=True)
VARIANTS = {"default": {}, "changed": CHANGED, "learned": dict(pos_encoding="learned", bias=True), "alibi": ALIBI,
            "alibi-6-heads": {**ALIBI, "n_head": 6, "n_embd": 48}, "none": dict(pos_encoding="none")}


def without_mlp(model):
    """The model with every MLP's output zeroed (c_proj weights and biases): the block is attention alone."""
    with torch.no_grad():
        for p in (p for name, p in model.named_parameters() if ".mlp.c_proj." in name):
            p.zero_()
    return model


def ours_with_ggml_gelu(model, idx):
    with torch.no_grad(), export_gguf.with_ggml_gelu(model):
        return model(idx)[0][0].numpy()  # (T, vocab)


@pytest.mark.parametrize("rope_type, variant, activation", [
    ("none", "default", "gelu"), ("linear", "default", "gelu"), ("yarn", "changed", "gelu"), ("ntk", "changed", "gelu"),
    ("none", "learned", "gelu"), ("none", "alibi", "gelu"), ("none", "alibi-6-heads", "gelu_tanh"),
    ("none", "none", "gelu"), ("none", "default", "gelu_tanh"), ("yarn", "changed", "gelu_tanh"),
    ("none", "learned", "gelu_tanh")])
def test_llama_cpp_gives_our_logits(rope_type, variant, activation, tmp_path):
    """llama.cpp (llama-cpp-python) on the exported f32 file against our model run with llama.cpp's GELU, with and
    without the MLPs, and a gelu_tanh model also as it is, at L and at 4L; only where llama_cpp is importable."""
    pytest.importorskip("llama_cpp")
    model = random_model(SCALINGS[rope_type], activation=activation, **VARIANTS[variant])
    attention_only = without_mlp(random_model(SCALINGS[rope_type], activation=activation, **VARIANTS[variant]))
    paths = [export_gguf.write_gguf(m, tmp_path / f"{i}.gguf", "f32") for i, m in enumerate((model, attention_only))]
    for T in sorted({L, model.config.block_size if variant == "learned" else 4 * L}):
        idx = torch.randint(0, 50257, (1, T), generator=torch.Generator().manual_seed(T))
        theirs, theirs_attention = (export_gguf.llama_cpp_logits(p, idx[0].tolist()) for p in paths)
        ours = ours_with_ggml_gelu(model, idx)
        scale = max(1.0, np.abs(ours).max())
        assert np.abs(theirs - ours).max() <= WHOLE_TOL * scale, (rope_type, variant, T)
        ours_attention = ours_with_ggml_gelu(attention_only, idx)
        assert np.abs(theirs_attention - ours_attention).max() <= MAPPING_TOL * max(1.0, np.abs(ours_attention).max())
        if activation == "gelu_tanh":
            with torch.no_grad():
                as_is = model(idx)[0][0].numpy()
            assert np.abs(theirs - as_is).max() <= WHOLE_TOL * scale, (rope_type, variant, T)


# llama.cpp on a q8_0 file against our f32 model (its GELU), relative to the largest logit: the weights' 8-bit
# rounding, and llama.cpp's own of the activations (its q8_0 dot product quantizes both sides); measured up to
# 2.7e-2 here. Values reversed within each block of 32 (a wrong layout) measured 1.5, the logits' own size.
Q8_TOL = 6e-2


@pytest.mark.parametrize("variant", ["default", "changed"])
def test_llama_cpp_runs_q8_0_files_within_their_rounding(variant, tmp_path):
    """q8_0 with llama.cpp's --no-repack (export_gguf.open_llama): its AMX kernels crash on Q8_0 on an AMX VM."""
    pytest.importorskip("llama_cpp")
    model = random_model(**({"default": {}, "changed": CHANGED}[variant]))
    path = export_gguf.write_gguf(model, tmp_path / "m.gguf", "q8_0")
    idx = torch.randint(0, 50257, (1, 4 * L), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), export_gguf.with_ggml_gelu(model):
        ours = model(idx)[0][0].numpy()
    theirs = export_gguf.llama_cpp_logits(path, idx[0].tolist(), repack=False)
    assert np.abs(theirs - ours).max() <= Q8_TOL * np.abs(ours).max(), variant


def test_llama_cpp_comparison_sees_small_mapping_errors(tmp_path):
    """The comparison above is sharp: against the same file (MLPs zeroed), a model with θ 1% off, the other
    pairing, YaRN without its attention factor, PI instead of YaRN, or ALiBi slopes 1% off is far outside
    MAPPING_TOL."""
    pytest.importorskip("llama_cpp")
    idx = torch.randint(0, 50257, (1, 4 * L), generator=torch.Generator().manual_seed(0))
    cases = {"rope": (without_mlp(random_model(SCALINGS["yarn"], **CHANGED)),
                      (dict(rope_theta=505.0), dict(rope_layout="half"),
                       dict(rope_scaling={**SCALINGS["yarn"], "attention_factor": 1.0}),
                       dict(rope_scaling=SCALINGS["linear"]))),
             "alibi": (without_mlp(random_model(**ALIBI)), ("slopes",))}
    for name, (model, changes) in cases.items():
        theirs = export_gguf.llama_cpp_logits(export_gguf.write_gguf(model, tmp_path / f"{name}.gguf"), idx[0].tolist())
        for change in changes:
            other = GPT(dataclasses.replace(model.config, **(change if change != "slopes" else {}))).eval()
            other.load_state_dict(model.state_dict())
            if change == "slopes":
                other.transformer.pos.slopes *= 1.01
            ours = ours_with_ggml_gelu(other, idx)
            assert np.abs(theirs - ours).max() > 10 * MAPPING_TOL * np.abs(ours).max(), (name, change)
