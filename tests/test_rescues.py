"""The rescue recipes beside PI and YaRN: the direct fine-tune (the control), ABF, PoSE, Self-Extend and DroPE.

Properties each must have: PoSE's position ids (increasing, below the target, every distance reachable; one
chunk is the plain fine-tune), Self-Extend's exact cases (plain RoPE inside the window and with G = 1, every
RoPE-family scheme unchanged when the window covers the sequence; cached equals full; weights that sum to 1) and its
positions against the paper's formula, ABF's bound, and a DroPE model that loads, samples and evaluates past L.
"""

import math

import pytest
import torch
from conftest import sharpened, stdlib_corpus
from torch.testing import assert_close

import evaluate
import extend_context
import sample
import train
from extend_context import ExtendConfig, extend
from model import GPT, GPTConfig
from posenc import generation
from posenc.checkpoint import load_checkpoint, model_from_checkpoint
from posenc.cli import cli
from posenc.config import ConfigError
from posenc.pose import pose_positions
from posenc.positions import SCHEMES, RoPE, rope_cos_sin, self_extend_attention, set_self_extend
from posenc.rope_scaling import abf_base, inverse_frequencies, rope_frequencies
from train import TrainConfig

BASE_LEN, TARGET_LEN = 32, 128
TIGHT = dict(atol=2e-5, rtol=1e-5)  # fp32: only the order of floating point sums differs


# ----------------------------------------------------------------------------- PoSE's position ids

@pytest.mark.parametrize("chunks", [2, 3])
def test_pose_ids_increase_stay_below_the_target_and_reach_every_distance(chunks):
    window, target = 8, 32
    pos = pose_positions(3000, window, target, chunks, torch.Generator().manual_seed(0))
    assert pos.shape == (3000, window) and pos.dtype == torch.long
    steps = pos.diff(dim=1)
    assert (steps >= 1).all()  # increasing: within a chunk by exactly 1, across a skip by more
    assert ((steps > 1).sum(dim=1) <= chunks - 1).all()  # at most one jump per chunk boundary
    assert pos.min() == 0 and pos.max() == target - 1  # the first id is 0; the largest reaches target - 1, never more
    distances = set((pos[:, None, :] - pos[:, :, None]).flatten().tolist())
    assert set(range(1, target)) <= distances  # every relative distance up to the target occurs


def test_pose_with_one_chunk_is_the_plain_positions():
    pos = pose_positions(5, 16, 64, 1, torch.Generator().manual_seed(0))
    assert torch.equal(pos, torch.arange(16).expand(5, 16))


@pytest.mark.parametrize("window, target, chunks, message", [
    (8, 32, 0, "1 <= chunks <= window"), (8, 32, 9, "1 <= chunks <= window"), (8, 4, 2, "shorter than its window")])
def test_pose_bad_settings_are_one_line(window, target, chunks, message):
    with pytest.raises(ValueError, match=message):
        pose_positions(1, window, target, chunks, torch.Generator())


def test_position_ids_0_to_T_are_the_plain_forward_and_refuse_a_cache(tiny):
    model = sharpened(tiny(pos_encoding="rope", rope_scaling={"rope_type": "linear", "factor": 4.0,
                                                             "original_max_position_embeddings": 32}, block_size=128))
    idx = torch.randint(0, 128, (2, 24))
    plain = model(idx)[0]
    assert_close(model(idx, pos=torch.arange(24))[0], plain, **TIGHT)
    assert_close(model(idx, pos=torch.arange(24).expand(2, 24))[0], plain, **TIGHT)
    skip = torch.stack([torch.zeros(24, dtype=torch.long), (torch.arange(24) >= 12) * 50])  # row 1: a skip at 12
    shifted = model(idx, pos=torch.arange(24) + skip)[0]  # (B, T) ids, one row each
    assert_close(shifted[0], plain[0], **TIGHT)
    assert_close(shifted[1, :12], plain[1, :12], **TIGHT)  # before the skip, and RoPE is relative: unchanged
    assert (shifted[1, 12:] - plain[1, 12:]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="do not go together"):
        model(idx, kv_cache=model.make_kv_cache(2, 24), pos=torch.arange(24))


# ----------------------------------------------------------------------------- Self-Extend

def rope_model(tiny, **kw):
    return sharpened(tiny(pos_encoding="rope", block_size=32, **kw))


def self_extended(model, window, group):
    other = GPT(model.config).eval()
    other.load_state_dict(model.state_dict())
    return set_self_extend(other, window, group)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_self_extend_is_plain_rope_inside_the_window_and_with_group_1(tiny, layout):
    model = rope_model(tiny, rope_layout=layout)
    idx = torch.randint(0, 128, (2, 64))
    plain = model(idx)[0]
    assert_close(self_extended(model, 64, 4)(idx)[0], plain, **TIGHT)  # every distance < W = 64
    assert_close(self_extended(model, 8, 1)(idx)[0], plain, **TIGHT)  # G = 1: grouped positions are the positions
    grouped = self_extended(model, 8, 4)(idx)[0]  # the comparison is sharp: past W with G > 1 it differs
    assert_close(grouped[:, :8], plain[:, :8], **TIGHT)
    assert (grouped - plain).abs().max() > 1e-3


ROPE_FAMILY = [name for name, cls in SCHEMES.items() if issubclass(cls, RoPE) and cls.no_self_extend is None]


@pytest.mark.parametrize("scheme", ROPE_FAMILY)
def test_self_extend_with_the_window_past_the_sequence_is_the_plain_model(tiny, scheme):
    """Every distance within W: Self-Extend must run the model as it is, NoPE layers (rope_nope) unrotated too."""
    model = sharpened(tiny(pos_encoding=scheme, n_layer=4, block_size=48))  # rope_nope: layer 3 is a NoPE layer
    idx = torch.randint(0, 128, (2, 48))
    assert_close(self_extended(model, 64, 2)(idx)[0], model(idx)[0], **TIGHT)


def test_self_extend_cached_decoding_equals_the_full_forward(tiny):
    model = self_extended(rope_model(tiny), 8, 4)
    idx = torch.randint(0, 128, (2, 80))  # past the training length 32
    with torch.no_grad():
        full = model(idx)[0]
        cache = model.make_kv_cache(2, 80)
        cached = [model(idx[:, :20], kv_cache=cache)[0]] + [model(idx[:, t:t + 1], kv_cache=cache)[0]
                                                            for t in range(20, 80)]
    assert_close(torch.cat(cached, dim=1), full, **TIGHT)
    out = generation.generate(model, idx[:, :10], 30, temperature=0)
    assert torch.equal(out, generation.generate(model, idx[:, :10], 30, temperature=0, use_cache=False))


def test_self_extend_weights_sum_to_1():
    """With every value 1, the output is the sum of the attention weights: 1 for every query, cached or not."""
    q, k = torch.randn(2, 3, 40, 8), torch.randn(2, 3, 40, 8)
    cos, sin = (t.float() for t in (torch.randn(200, 4), torch.randn(200, 4)))
    pos = torch.arange(40)
    out = self_extend_attention(q, k, torch.ones(2, 3, 40, 8), pos, pos, cos, sin, "half", 6, 3, chunk=16)
    assert_close(out, torch.ones_like(out))
    last = self_extend_attention(q[..., -1:, :], k, torch.ones(2, 3, 40, 8), pos[-1:], pos, cos, sin, "half", 6, 3)
    assert_close(last, torch.ones_like(last))


def paper_self_extend(q, k, v, window, group, inv_freq):
    """Self-Extend as Jin et al. 2024 (LLM Maybe LongLM) define it, in float64, one (query, key) pair at a time:
    the relative position of query i and key j is i - j inside the neighbor window (i - j < W), and
    floor(i / G) - floor(j / G) + W - floor(W / G) beyond it; the score is RoPE's at that relative position,
    <R(d) q_i, k_j> / sqrt(hs) (half pairing: dim m with m + hs/2), under one causal softmax."""
    T, hs = q.size(-2), q.size(-1)
    out = torch.zeros(q.shape, dtype=torch.float64)
    for i in range(T):
        scores = torch.full(q.shape[:-2] + (T,), -math.inf, dtype=torch.float64)  # (B, nh, Tk)
        for j in range(i + 1):
            d = i - j if i - j < window else i // group - j // group + window - window // group
            angle = d * inv_freq  # (hs/2,)
            q1, q2 = q[..., i, : hs // 2].double(), q[..., i, hs // 2:].double()
            rotated = torch.cat((q1 * angle.cos() - q2 * angle.sin(), q1 * angle.sin() + q2 * angle.cos()), -1)
            scores[..., j] = (rotated * k[..., j, :].double()).sum(-1) / math.sqrt(hs)
        out[..., i, :] = (scores.softmax(-1)[..., None, :] @ v.double())[..., 0, :]  # (B, nh, hs)
    return out


@pytest.mark.parametrize("chunk", [7, None])  # explicit scores in blocks of 7 queries; the CPU's flash kernel
@pytest.mark.parametrize("window, group", [(6, 3), (5, 2), (7, 4)])  # W not a multiple of G: floor(W / G) shows
def test_self_extend_positions_are_the_papers(window, group, chunk):
    """Our attention against the paper's relative positions, for every query and for the last one alone (the
    cached step). fp32 against float64: 1e-5 allows fp32 rounding of sharp scores (q, k ~ N(0, 3^2))."""
    B, nh, T, hs = 1, 2, 30, 8
    q, k, v = (torch.randn(B, nh, T, hs) * s for s in (3, 3, 1))
    inv_freq = 1.0 / 10000 ** (torch.arange(0, hs, 2, dtype=torch.float64) / hs)
    cos, sin = rope_cos_sin(torch.arange(4 * T), inv_freq)
    pos = torch.arange(T)
    paper = paper_self_extend(q, k, v, window, group, inv_freq)
    ours = self_extend_attention(q, k, v, pos, pos, cos, sin, "half", window, group, chunk=chunk)
    assert_close(ours.double(), paper, atol=1e-5, rtol=0)
    last = self_extend_attention(q[..., -1:, :], k, v, pos[-1:], pos, cos, sin, "half", window, group)
    assert_close(last.double(), paper[..., -1:, :], atol=1e-5, rtol=0)


@pytest.mark.parametrize("window, group", [(0, 4), (8, 0), (8.5, 2), (True, 2)])
def test_a_bad_window_or_group_is_one_line(tiny, window, group):
    with pytest.raises(ValueError, match="bad Self-Extend (window|group)") as e:
        set_self_extend(rope_model(tiny), window, group)
    assert "\n" not in str(e.value)


def test_self_extend_refuses_what_it_cannot_run(tiny):
    with pytest.raises(ValueError, match="regroups RoPE positions; this model has 'alibi'"):
        set_self_extend(tiny(pos_encoding="alibi"), 8, 4)
    dynamic = rope_model(tiny, rope_scaling={"rope_type": "dynamic", "factor": 4.0,
                                             "original_max_position_embeddings": 32})
    with pytest.raises(ValueError, match="changes them with the length"):
        set_self_extend(dynamic, 8, 4)


@pytest.mark.parametrize("main, argv", [(sample.main, ["--ckpt=x.pt", "--self_extend=8"]),
                                        (sample.main, ["--ckpt=x.pt", "--self_extend=0,4"]),
                                        (evaluate.main, ["--ckpt=x.pt", "--self_extend=8,2,1"])])
def test_self_extend_flags_are_checked_in_one_line(main, argv):
    with pytest.raises(SystemExit) as e:
        cli(main, argv)
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "self_extend" in msg.lower() and "\n" not in msg, msg


# ----------------------------------------------------------------------------- ABF and the direct control

def test_abf_bound_is_xu_et_al_s():
    assert abf_base(32768) == pytest.approx(0.0424 * 32768 ** 1.628, rel=1e-12)
    assert abf_base(4096) == pytest.approx(0.0424 * math.exp(1.628 * math.log(4096)), rel=1e-12)
    scaling, target = extend_context.rope_scaling_for(GPTConfig(block_size=4096), "abf", factor=8)
    assert target == 32768 and scaling["base"] == pytest.approx(0.0424 * 32768 ** 1.628)
    inv_freq, attention_factor = rope_frequencies(32, 1e4, scaling)
    assert_close(inv_freq, inverse_frequencies(scaling["base"], 32), rtol=1e-12, atol=0) and attention_factor == 1.0
    given, _ = extend_context.rope_scaling_for(GPTConfig(block_size=256), "abf", factor=4, params={"base": 5e5})
    assert given["base"] == 5e5


def test_abf_refuses_a_bound_below_the_model_s_base():
    with pytest.raises(ValueError, match="below this model's base 10000: ABF would not raise it"):
        extend_context.rope_scaling_for(GPTConfig(block_size=256), "abf", factor=4)  # the bound at 1024: 3374


def test_direct_is_plain_rope_at_every_length(tiny):
    plain = tiny(pos_encoding="rope", block_size=128)
    direct = tiny(pos_encoding="rope", block_size=128,
                  rope_scaling={"rope_type": "direct", "factor": 4.0, "original_max_position_embeddings": 32})
    direct.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 128, (1, 128))
    assert torch.equal(direct(idx)[0], plain(idx)[0])


# ----------------------------------------------------------------------------- end to end on a tiny corpus

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("rescues")
    return stdlib_corpus(root, ("email", "json", "http", "logging"))


def tiny_train(root, name, max_iters=5, block_size=BASE_LEN, **kw):
    return TrainConfig(out_dir=str(root / name), data_dir=str(root / "data"), batch_size=4, max_iters=max_iters,
                       learning_rate=3e-3, min_lr=3e-4, warmup_iters=1, eval_interval=10_000, eval_iters=1,
                       log_interval=1, ckpt_interval=10_000, seed=0, compile=False, **kw,
                       model=GPTConfig(block_size=block_size, n_layer=2, n_head=2, n_embd=32))


@pytest.fixture(scope="module")
def base_ckpt(corpus):
    return train.main(tiny_train(corpus, "base"))["ckpt"]


def weights(path):
    return load_checkpoint(path)["model"]


def test_pose_with_one_chunk_and_the_whole_window_is_the_plain_run(corpus, base_ckpt):
    plain = train.main(tiny_train(corpus, "plain", max_iters=3, init_from=base_ckpt))
    pose = train.main(tiny_train(corpus, "pose1", max_iters=3, init_from=base_ckpt, pose_window=BASE_LEN,
                                 pose_chunks=1))
    assert pose["train_loss"] == plain["train_loss"]
    for k, w in weights(plain["ckpt"]).items():
        assert torch.equal(weights(pose["ckpt"])[k], w), k


def test_pose_trains_on_the_ordinary_windows_and_loss(corpus, base_ckpt):
    """A PoSE step: the sampler's windows of pose_window tokens, every target counted, only the ids moved."""
    cfg = train.resolve(tiny_train(corpus, "pose_step", block_size=64, pose_window=16, pose_chunks=2, dtype="float32"))
    (corpus / "pose_step").mkdir()
    run = train.setup(cfg, "cpu")
    assert run.train_sampler.block_size == 16 and run.val_sampler.block_size == 64
    state = run.train_sampler.state_dict()
    x, y = run.train_sampler.next()
    pos = run.pose.draw(x.size(0), run.train_sampler.step, "cpu")
    assert pos.max() < 64 and pos.shape == x.shape
    with torch.no_grad():
        expected = run.model(x, y, pos=pos)[1].item()
        per_token = run.model(x, y, pos=pos, reduction="none")[1]
    assert per_token.shape == y.shape and (per_token > 0).all()  # no target is masked
    run.train_sampler.load_state_dict(state)
    assert train.train_step(run) == pytest.approx(expected, rel=1e-6)
    run.metrics.close()


def test_extend_with_pose_reaches_the_target_at_the_base_window_and_equal_tokens(corpus, base_ckpt):
    path = extend(ExtendConfig(ckpt=base_ckpt, method="linear", factor=4, steps=2, pose=True,
                               out_dir=str(corpus / "pi_pose")), dict(eval_iters=1))
    full = extend(ExtendConfig(ckpt=base_ckpt, method="linear", factor=4, steps=2, out_dir=str(corpus / "pi_full")),
                  dict(eval_iters=1, min_doc_len=0))
    c, f = load_checkpoint(path)["config"], load_checkpoint(full)["config"]
    assert c["model"]["block_size"] == TARGET_LEN and c["pose_window"] == BASE_LEN and c["pose_chunks"] == 2
    assert c["model"]["rope_scaling"]["rope_type"] == "linear" and f["pose_window"] == 0
    tokens = lambda c, T: c["batch_size"] * c["grad_accum_steps"] * T  # noqa: E731
    assert tokens(c, BASE_LEN) == tokens(f, TARGET_LEN)  # equal tokens per step: only the window length differs
    assert load_checkpoint(path)["extension"]["pose_chunks"] == 2


def test_drope_model_has_no_positions_loads_samples_and_evaluates_past_L(corpus, base_ckpt):
    path = extend(ExtendConfig(ckpt=base_ckpt, method="drope", steps=3, out_dir=str(corpus / "drope")),
                  dict(eval_iters=1))
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 3 and ckpt["extension"]["method"] == "drope"
    m = ckpt["config"]["model"]
    assert m["pos_encoding"] == "none" and m["rope_scaling"] is None and m["block_size"] == BASE_LEN
    for k, w in weights(base_ckpt).items():  # recalibrated: every weight trained on, none added or dropped
        assert ckpt["model"][k].shape == w.shape
    assert any(not torch.equal(ckpt["model"][k], w) for k, w in weights(base_ckpt).items())
    model, _ = model_from_checkpoint(path)
    out = generation.generate(model, torch.zeros(1, 1, dtype=torch.long), 3 * BASE_LEN, temperature=0)
    assert out.shape == (1, 3 * BASE_LEN + 1)
    results = evaluate.run_tasks({"drope": path}, evaluate.EvalConfig(
        data_dir=str(corpus / "data"), max_len=4 * BASE_LEN, base_len=BASE_LEN, out_dir="", tasks=("ppl",), n_docs=2))
    ppl = {e["window"]: e.get("ppl") for e in results["models"]["drope"]["ppl"]}
    assert set(ppl) == {BASE_LEN, 2 * BASE_LEN, 4 * BASE_LEN} and all(p and math.isfinite(p) for p in ppl.values())


@pytest.mark.parametrize("ext, message", [
    (dict(method="drope", steps=0), "give --steps > 0"),
    (dict(method="drope", steps=2, factor=4), "drope takes no --factor"),
    (dict(method="linear", factor=4, pose=True), "--pose is a way to fine-tune"),
])
def test_recipe_misuse_is_one_line(base_ckpt, ext, message):
    with pytest.raises(ConfigError, match=message):
        extend(ExtendConfig(ckpt=base_ckpt, **ext))
