"""explain.py: angle coverage against hand numbers, the attention probe against a plain softmax, the share of
attention beyond L by its definition, and the command on every scheme."""

import math
import os
import sysconfig
from unittest.mock import patch

import pytest
import torch

import explain
import train
from data.prepare import prepare
from model import record_attention
from posenc import attention
from posenc.cli import cli
from posenc.positions import SCHEMES
from posenc.rope_scaling import inverse_frequencies


def test_pairs_that_never_turn_within_L_match_a_hand_count():
    # θ = 1e4, d = 64, L = 4096: wavelength 2π·1e4^(2i/64) > 4096 from i = 23 (4712; i = 22 gives 3533): 9 pairs
    cov = explain.angle_coverage(inverse_frequencies(1e4, 64), 4096, 4 * 4096)
    assert cov["no_full_turn"] == 9 and [i for i, x in enumerate(cov["leaves"]) if x] == list(range(23, 32))
    # the CPU scale, d = 128 / 4 heads = 32, L = 256: 2π·1e4^(2i/32) > 256 from i = 7 (353; i = 6 gives 199)
    cov = explain.angle_coverage(inverse_frequencies(1e4, 32), 256, 2048)
    assert cov["no_full_turn"] == 9 and sum(cov["leaves"]) == 9
    assert cov["wavelength"][7] == pytest.approx(2 * math.pi * 1e4 ** (14 / 32))


@pytest.mark.parametrize("s", [2, 4, 8])
def test_position_interpolation_keeps_every_pair_in_its_trained_range(s):
    inv = inverse_frequencies(1e4, 32)
    cov = explain.angle_coverage(inv / s, 256, s * 256, trained_freq=inv)
    assert not any(cov["leaves"])
    assert any(explain.angle_coverage(inv / s, 256, 2 * s * 256, trained_freq=inv)["leaves"])  # past s·L: out again


def test_the_share_beyond_L_is_a_count_of_far_keys():
    probs = torch.tensor([[1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0.2, 0.3, 0.5, 0], [0.1, 0.2, 0.3, 0.4]])
    # L = 2: query 2 sees key 0 at distance 2; query 3 sees keys 0 and 1 at distances 3 and 2
    torch.testing.assert_close(explain.far_share(probs, 2), torch.tensor([0.0, 0.0, 0.2, 0.3]))
    assert explain.far_share(probs, 4).sum() == 0  # a sequence no longer than L has no key that far


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_the_probe_sees_a_plain_softmax_and_the_forward_is_unchanged(tiny, scheme):
    model = tiny(pos_encoding=scheme)
    if scheme == "cope":  # its tables start at zero, where it is NoPE
        with torch.no_grad():
            [t.normal_() for t in model.transformer.pos.tables]
    idx = torch.randint(0, 128, (2, 24))
    seen = {}

    def probe(layer, p, q_pos, k_pos):  # blocks of queries, each over the keys it can see: put back as (T, T)
        full = seen.setdefault(layer, torch.zeros(2, 4, 24, 24))
        full[:, :, q_pos[:, None], k_pos[None, :]] = p

    with torch.no_grad():
        fast = model(idx)[0]
        with record_attention(model, probe), patch.object(attention, "BLOCK_ELEMENTS", 2 * 4 * 5 * 24):
            shown = model(idx)[0]  # blocks of 5 queries
    torch.testing.assert_close(shown, fast, atol=1e-5, rtol=1e-5)  # fp32 math vs the fused kernel's order
    assert sorted(seen) == [0, 1]
    torch.testing.assert_close(seen[0].sum(-1), torch.ones(2, 4, 24))
    # layer 0 by hand: embeddings, ln_1, q and k, the scheme's rotation and bias, the causal mask, softmax
    pos = torch.arange(24)
    scheme_ = model.transformer.pos
    scheme_.prepare(24, idx.device)
    x = model.transformer.wte(idx)
    pe = scheme_.embed(pos)
    x = x + pe if pe is not None else x
    block = model.transformer.h[0]
    h = block.ln_1(x)
    q, k, _ = block.attn.c_attn(h).split(32, dim=2)
    q, k = (t.view(2, 24, 4, 8).transpose(1, 2) for t in (q, k))  # (B, nh, T, hs)
    q, k = scheme_.rotate(q, k, pos, 0)
    future = torch.ones(24, 24, dtype=torch.bool).triu(1)
    scores = (q @ k.transpose(-2, -1) / math.sqrt(8)).masked_fill(future, -math.inf)
    bias = scheme_.attn_bias(pos, pos, 0)
    scores = scores + bias if bias is not None else scores
    if scheme == "fox":  # + log f_(j+1) + ... + log f_i, f = sigmoid of the gate's Linear of ln_1(x)
        log_f = torch.nn.functional.logsigmoid(scheme_.gate[0](h)).transpose(1, 2)  # (B, nh, T)
        scores = scores + torch.stack([torch.stack([log_f[..., j + 1:i + 1].sum(-1) for j in range(24)], -1)
                                       for i in range(24)], -2)
    if scheme == "cope":  # + q_i·e[p_ij], p_ij = sum of sigmoid(scores) from j to i, e read between integers
        p = torch.stack([scores.sigmoid()[..., j:].sum(-1) for j in range(24)], -1).clamp(max=scheme_.npos_max - 1)
        at = q @ scheme_.tables[0].T  # (B, nh, T, npos_max)
        w = p - p.floor()
        scores = scores + at.gather(-1, p.floor().long()) * (1 - w) + at.gather(-1, p.ceil().long()) * w
    expected = scores.softmax(-1)
    torch.testing.assert_close(seen[0], expected.detach(), atol=1e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    prepare(os.path.join(sysconfig.get_paths()["stdlib"], "email", "*.py"), out, val_fraction=0.2, quiet=True)
    return str(out)


def trained(data_dir, out_dir, scheme, **extra):
    flags = dict(data_dir=data_dir, out_dir=out_dir, device="cpu", n_layer=2, n_head=2, n_embd=32, block_size=32,
                 batch_size=4, max_iters=2, warmup_iters=1, eval_interval=2, eval_iters=1, log_interval=1,
                 ckpt_interval=2, pos_encoding=scheme, **extra)
    return train.main([f"--{k}={v}" for k, v in flags.items()])["ckpt"]


@pytest.mark.parametrize("scheme", [s for s in SCHEMES if s != "learned"])
def test_explain_writes_every_section_for_every_scheme(data_dir, tmp_path, scheme):
    ckpt = trained(data_dir, tmp_path / "run", scheme)
    md = cli(explain.main, [f"--ckpt={ckpt}", "--max_len=128", "--n_docs=2"]).read_text()
    for section in ("## 1. Angle coverage", "## 2. The shape of q·k", "## 3. What the trained model does"):
        assert section in md
    assert "share of attention on keys farther than 32" in md
    out = tmp_path / "run" / "explain"
    assert (out / "attention.png").exists() and (out / "explain.json").exists()
    if scheme in ("rope", "sinusoidal"):
        assert (out / "angles.png").exists() and "never complete a turn" in md
    with pytest.raises(SystemExit, match="holds an earlier explanation"):  # the folder is owned
        cli(explain.main, [f"--ckpt={ckpt}", "--max_len=128", "--n_docs=2"])


def test_explain_a_scaled_model_and_its_limits(data_dir, tmp_path):
    ckpt = trained(data_dir, tmp_path / "rope", "rope")
    md = cli(explain.main, [f"--ckpt={ckpt}", "--max_len=128", "--n_docs=2", f"--out_dir={tmp_path / 'x'}",
                            '--rope_scaling={"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 32}'
                            ]).read_text()
    assert "'rope_type': 'yarn'" in md and "pairs" in md  # the scaling asked for, not the checkpoint's
    learned = trained(data_dir, tmp_path / "learned", "learned")
    with pytest.raises(SystemExit) as e:
        cli(explain.main, [f"--ckpt={learned}", "--max_len=128"])
    assert "learned embeddings cannot extrapolate" in str(e.value) and "--max_len=32" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(SystemExit, match="no checkpoint at"):
        cli(explain.main, [f"--ckpt={tmp_path / 'missing.pt'}"])
    md = cli(explain.main, [f"--ckpt={learned}", "--max_len=32", "--n_docs=2"]).read_text()
    assert "table of 32 rows" in md
