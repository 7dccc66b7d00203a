"""evaluate.py on tiny random models (CPU): bucketing, sliding windows, passkey prompts, recall probes, the wall."""
import dataclasses
import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import EXPORT_LEN, random_export_model, randomized, tiny_config
from torch.testing import assert_close

import evaluate
from evaluate import EvalConfig
from model import GPT
from posenc import eval_tasks as ev
from posenc import plots
from posenc.cli import cli
from posenc.data import held_out_documents, long_documents
from posenc.tokenizer import get_tokenizer


def tiny(pos="rope", block_size=32, vocab_size=256, n_layer=1):
    """Smaller than conftest's: 1 layer, 2 heads, a 256-token vocabulary."""
    return GPT(tiny_config(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=2,
                           pos_encoding=pos)).eval()


def random_docs(n, length, vocab=256, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, length) for _ in range(n)]


# ----------------------------------------------------------------------------- buckets and loss by position

@pytest.mark.parametrize("max_len, base_len", [(2048, 256), (512, 64), (100, 256), (1000, 48), (64, 64), (32768, 1024)])
def test_buckets_cover_positions_with_an_edge_at_base_len(max_len, base_len):
    buckets = ev.position_buckets(max_len, base_len)
    assert buckets[0][0] == 0 and buckets[-1][1] == max_len
    assert all(lo < hi for lo, hi in buckets)
    assert all(a[1] == b[0] for a, b in zip(buckets, buckets[1:]))  # no gaps, no overlaps
    edges = [lo for lo, _ in buckets]
    if base_len < max_len:
        assert base_len in edges
    assert all(hi / lo <= 2.01 for lo, hi in buckets[1:])  # log-spaced: at most an octave each


def direct_position_losses(model, docs, T):
    x = torch.tensor(np.stack([d[:T] for d in docs]))
    y = torch.tensor(np.stack([d[1:T + 1] for d in docs]))
    with torch.no_grad():
        return model(x, y, reduction="none")[1]  # (n_docs, T)


@pytest.mark.parametrize("pos", ["rope", "alibi", "sinusoidal"])
def test_loss_by_position_matches_a_direct_computation(pos):
    model, docs = tiny(pos), random_docs(5, 80)
    buckets = ev.position_buckets(64, 16)
    out = ev.loss_by_position(model, docs, 64, buckets, batch_size=2, curve_bin=24)
    direct = direct_position_losses(model, docs, 64)
    assert out["n_docs"] == 5 and out["n_tokens"] == 5 * 64 and out["cannot_run"] is None
    assert [(c["lo"], c["hi"]) for c in out["curve"]] == [(0, 24), (24, 48), (48, 64)]  # the last bin is cut at T
    for c in out["curve"]:
        torch.testing.assert_close(c["mean"], direct[:, c["lo"]:c["hi"]].mean().item(), rtol=1e-5, atol=1e-5)
    for b in out["buckets"]:
        per_doc = direct[:, b["lo"]:b["hi"]].mean(1)
        torch.testing.assert_close(b["mean"], direct[:, b["lo"]:b["hi"]].mean().item(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b["std"], per_doc.std().item(), rtol=1e-4, atol=1e-5)
        assert b["n_tokens"] == 5 * (b["hi"] - b["lo"])


def test_a_model_that_knows_nothing_has_loss_ln_vocab_at_every_position():
    model = tiny("rope")
    for p in model.parameters():
        p.data.zero_()  # zero logits: the uniform distribution
    out = ev.loss_by_position(model, random_docs(3, 70), 64, ev.position_buckets(64, 16))
    for b in out["buckets"]:
        assert b["mean"] == pytest.approx(math.log(256), abs=1e-4) and b["std"] == pytest.approx(0, abs=1e-4)


def test_learned_positions_past_their_table_cannot_run_instead_of_crashing():
    model, docs = tiny("learned", block_size=32), random_docs(3, 70)
    out = ev.loss_by_position(model, docs, 64, ev.position_buckets(64, 32), curve_bin=16)
    assert out["evaluated_len"] == 32 and "learned" in out["cannot_run"]
    assert out["curve"][-1]["hi"] == 32  # the curve stops where the model does
    direct = direct_position_losses(model, docs, 32)
    for b in out["buckets"]:
        if b["hi"] <= 32:
            assert b["mean"] == pytest.approx(direct[:, b["lo"]:b["hi"]].mean().item(), abs=1e-5)
        else:
            assert b["cannot_run"] and "mean" not in b
    assert "cannot_run" in ev.sliding_window_ppl(model, docs, 64)
    assert "loss" in ev.sliding_window_ppl(model, docs, 32)
    rec = ev.recall_by_distance(model, docs[0], [8, 40], span_len=4, trials=2, prefix_len=4)["by_distance"]
    assert "accuracy" in rec[0] and "cannot_run" in rec[1]


# ----------------------------------------------------------------------------- sliding windows

@pytest.mark.parametrize("n, window, stride", [(100, 32, 16), (33, 32, 16), (10, 32, 16), (257, 64, 64), (200, 50, 7)])
def test_sliding_windows_score_every_target_once_with_enough_context(n, window, stride):
    scored = []
    for i, (begin, end, new) in enumerate(ev.sliding_windows(n, window, stride)):
        assert end - begin <= window and 0 < new <= end - begin
        scored += range(end - new + 1, end + 1)  # tokens predicted by the last `new` inputs
        if i > 0:
            assert end - new - begin >= window - stride  # the first scored token sees >= W - S of context
    assert sorted(scored) == list(range(1, n))


def test_sliding_window_ppl_counts_and_plain_loss():
    model, docs = tiny("rope"), random_docs(2, 90)
    out = ev.sliding_window_ppl(model, docs, 32, stride=8, batch_size=3)
    assert out["n_tokens"] == sum(len(d) - 1 for d in docs) and out["stride"] == 8
    # batching pads windows of different lengths: the result must not depend on it
    one_by_one = ev.sliding_window_ppl(model, docs, 32, stride=8, batch_size=1)
    assert one_by_one["loss"] == pytest.approx(out["loss"], rel=1e-5)
    # a window that holds the whole document is the plain loss
    d = docs[0][:30]
    with torch.no_grad():
        plain = model(torch.tensor(d[None, :-1]), torch.tensor(d[None, 1:]))[1].item()
    whole = ev.sliding_window_ppl(model, d, 32)
    assert whole["n_tokens"] == 29 and whole["loss"] == pytest.approx(plain, rel=1e-5)
    assert whole["ppl"] == pytest.approx(math.exp(plain), rel=1e-5)
    assert ev.sliding_window_ppl(model, docs, 32)["stride"] == 16  # default: min(256, window // 2)


def test_nonoverlapping_ppl_is_the_mean_loss_of_disjoint_windows():
    """Press et al.'s mode: each document cut into windows of W inputs that do not overlap, every target scored, so a
    window's first token has no context. Computed here by hand, window by window, against the task's number."""
    model, docs = randomized(tiny("alibi")), random_docs(2, 90)  # attention sharp enough that context matters
    out = ev.sliding_window_ppl(model, docs, 32, stride=32, batch_size=2)
    assert out["mode"] == "nonoverlapping" and out["n_tokens"] == sum(len(d) - 1 for d in docs)
    total, count = 0.0, 0
    with torch.no_grad():
        for d in docs:
            for b in range(0, len(d) - 1, 32):  # inputs d[b:b + 32] predict d[b + 1:b + 33]
                x, y = d[b:min(b + 32, len(d) - 1)], d[b + 1:min(b + 33, len(d))]
                total += model(torch.tensor(x[None]), torch.tensor(y[None]))[1].item() * len(y)
                count += len(y)
    assert out["loss"] == pytest.approx(total / count, rel=1e-5)
    sliding = ev.sliding_window_ppl(model, docs, 32)
    assert sliding["mode"] == "sliding" and sliding["loss"] != pytest.approx(out["loss"], rel=1e-3)


def test_ppl_mode_is_a_setting_recorded_in_results_and_named_in_the_table(corpus, tmp_path):
    model = tiny("alibi", vocab_size=50304)
    tables = {}
    for mode in ("sliding", "nonoverlapping"):
        cfg = EvalConfig(data_dir=str(corpus), max_len=64, out_dir=str(tmp_path / mode), n_docs=2, tasks=("ppl",),
                         ppl_mode=mode)
        res = evaluate.run_tasks({"alibi": model}, cfg)
        entries = res["models"]["alibi"]["ppl"]
        assert [e["mode"] for e in entries] == [mode] * 2
        assert [e["stride"] for e in entries] == ([16, 32] if mode == "sliding" else [32, 64])
        assert res["settings"].get("ppl_mode", "sliding") == mode  # the default is left out: older results reused
        tables[mode] = (tmp_path / mode / "summary.md").read_text()
    assert "## Sliding-window perplexity" in tables["sliding"] and "W=64 (2L, S=32)" in tables["sliding"]
    assert "## Non-overlapping-window perplexity" in tables["nonoverlapping"]
    assert "W=64 (2L, S=64)" in tables["nonoverlapping"] and "Sliding" not in tables["nonoverlapping"]
    with pytest.raises(SystemExit) as e:
        cli(evaluate.main, ["--ckpt=x.pt", "--ppl_mode=nonoverlapping", "--stride=8"])
    assert "stride=8 slides the windows, but ppl_mode=nonoverlapping" in str(e.value) and "\n" not in str(e.value)


def test_short_context_loss_is_the_mean_over_its_windows():
    model, tokens = tiny("alibi"), random_docs(1, 500)[0]
    out = ev.short_context_loss(model, tokens, 16, n_windows=4, batch_size=3)
    starts = np.linspace(0, len(tokens) - 17, 4).astype(int)
    w = torch.tensor(np.stack([tokens[s:s + 17] for s in starts]))
    with torch.no_grad():
        expect = model(w[:, :-1], w[:, 1:])[1].item()
    assert out["loss"] == pytest.approx(expect, rel=1e-5) and out["n_tokens"] == 64


# ----------------------------------------------------------------------------- passkey

@pytest.fixture(scope="module")
def enc():
    return get_tokenizer()


@pytest.mark.parametrize("n_tokens", [100, 333, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_passkey_prompt_is_the_standard_prompt_at_the_requested_depth(enc, n_tokens, depth):
    tokens = ev.passkey_prompt(enc, n_tokens, depth, 31415)
    assert n_tokens - 8 < len(tokens) <= n_tokens  # short by less than one filler sentence
    text = enc.decode(tokens)
    assert enc.encode(text) == tokens  # the model sees exactly what the text says
    task, before, key_line, after, question = text.split("\n")
    assert task == ev.PASSKEY_TASK and question == ev.PASSKEY_QUESTION
    assert key_line == "The pass key is 31415. Remember it. 31415 is the pass key."
    cycle = " ".join(ev.PASSKEY_FILLER * 400)
    assert cycle.startswith(before) and cycle.startswith(after)  # whole filler sentences, in order
    n_before, n_after = before.count("."), after.count(".")
    assert n_before + n_after > 0 and abs(n_before - depth * (n_before + n_after)) <= 1


def test_passkey_prompt_too_short_says_so(enc):
    with pytest.raises(ValueError, match="needs at least"):
        ev.passkey_prompt(enc, 20, 0.5, 1)


@pytest.mark.parametrize("text, key", [("12345.", 12345), (" 12345 is the pass key", 12345), ("no number", None),
                                       ("", None), ("\n 7 and 8", 7), (" 4821", 4821)])
def test_parse_passkey(text, key):
    assert ev.parse_passkey(text) == key


def test_passkey_accuracy_reads_the_continuation(enc, monkeypatch):
    from posenc import generation

    def oracle(offset):  # a "model" that answers key + offset
        def generate(model, idx, max_new_tokens, **kw):
            key = ev.parse_passkey(enc.decode(idx[0].tolist()).split("The pass key is")[1])
            return torch.cat((idx, torch.tensor([enc.encode(f" {key + offset}. The")])), dim=1)
        return generate

    model = tiny("rope", vocab_size=50304)
    monkeypatch.setattr(generation, "generate", oracle(0))
    out = ev.passkey_accuracy(model, enc, [128, 256], depths=(0.0, 1.0), trials=2)
    assert [r["accuracy"] for r in out["by_length"]] == [1.0, 1.0]
    monkeypatch.setattr(generation, "generate", oracle(1))
    assert ev.passkey_accuracy(model, enc, [128], depths=(0.5,), trials=2)["by_length"][0]["accuracy"] == 0.0


def test_passkey_accuracy_on_a_real_model_and_past_the_wall(enc):
    rope, learned = tiny("rope", vocab_size=50304), tiny("learned", block_size=128, vocab_size=50304)
    out = ev.passkey_accuracy(rope, enc, [40, 128], depths=(0.0, 0.5), trials=1)
    assert "prompt needs at least" in out["by_length"][0]["cannot_run"]
    # the documented prompts (key from seed, length, depth and trial) through passkey_trial, one by one
    hits = [ev.passkey_trial(rope, enc, 128 - ev.PASSKEY_NEW_TOKENS, d, random.Random(f"0-128-{d}-0").randint(1, 50000))
            for d in (0.0, 0.5)]
    row = out["by_length"][1]
    assert [r["accuracy"] for r in row["by_depth"]] == [float(h) for h in hits] and row["n_trials"] == 2
    assert row["accuracy"] == sum(hits) / 2
    out = ev.passkey_accuracy(learned, enc, [128, 256], depths=(0.5,), trials=1)
    assert "accuracy" in out["by_length"][0] and "learned" in out["by_length"][1]["cannot_run"]


def test_a_model_error_in_passkey_or_recall_stops_the_evaluation(enc, monkeypatch):
    """Only a length too short for the prompt (or text too short for a probe) is "cannot run": a model that fails
    (FlexAttention's "Mixed query, key, and value dtype" is a ValueError) stops the evaluation instead of reading
    as a scheme that cannot run that length."""
    from posenc import generation

    def broken(*args, **kwargs):
        raise ValueError("Mixed query, key, and value dtype is not supported")

    model = tiny("alibi", vocab_size=50304)
    monkeypatch.setattr(generation, "generate", broken)
    with pytest.raises(ValueError, match="Mixed query"):
        ev.passkey_accuracy(model, enc, [128], depths=(0.5,), trials=1)
    out = ev.recall_by_distance(tiny("rope"), np.arange(60) % 200, [8, 80], span_len=4, trials=1, prefix_len=4)
    rows = out["by_distance"]
    assert "accuracy" in rows[0] and "needs more text" in rows[1]["cannot_run"]  # 88 tokens from 60: cannot run


# ----------------------------------------------------------------------------- recall probe

@pytest.mark.parametrize("kind", ["random", "text"])
@pytest.mark.parametrize("span_len, distance, prefix_len", [(4, 4, 0), (8, 50, 5), (16, 300, 32)])
def test_recall_probe_repeats_the_span_at_exactly_distance_d(kind, span_len, distance, prefix_len):
    src = np.arange(20000) % 5000  # consecutive ids: ordinary "text" has step 1 outside the copies
    idx, mask = ev.recall_probe(src, span_len, distance, np.random.default_rng(0), prefix_len, kind)
    T = prefix_len + distance + span_len
    assert idx.shape == mask.shape == (T,)
    first, second = idx[prefix_len:prefix_len + span_len], idx[prefix_len + distance:]
    assert torch.equal(first, second)
    expect = torch.zeros(T, dtype=torch.bool)
    expect[prefix_len + distance + 1:] = True  # the second copy except its first token
    assert torch.equal(mask, expect)
    outside = [i for i in range(T) if not (prefix_len <= i < prefix_len + span_len or i >= prefix_len + distance)]
    steps = [(idx[j] - idx[i]) % 5000 for i, j in zip(outside, outside[1:]) if j == i + 1]
    assert all(s == 1 for s in steps)  # the rest is an untouched slice of the source
    with pytest.raises(ValueError, match="overlap"):
        ev.recall_probe(src, span_len, span_len - 1, np.random.default_rng(0))


@pytest.mark.parametrize("pos", ["rope", "alibi", "learned"])
def test_recall_scores_equal_the_full_forward(pos):
    """The KV-cache path (logits only for the second copy) gives the full forward's losses and argmaxes."""
    model, src = tiny(pos, block_size=64, n_layer=2), random_docs(1, 2000)[0]
    rng = np.random.default_rng(1)
    idx, mask = (torch.stack(t) for t in zip(*[ev.recall_probe(src, 6, 20, rng, 8) for _ in range(3)]))
    loss, hit, m = ev.scored_predictions(model, idx, mask)
    with torch.no_grad():
        logits = model(idx[:, :-1])[0]  # (B, T-1, V)
    full_loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), idx[:, 1:], reduction="none")
    S = m.size(1)
    torch.testing.assert_close(loss, full_loss[:, -S:], rtol=1e-4, atol=1e-4)
    assert torch.equal(hit, logits[:, -S:].argmax(-1) == idx[:, -S:]) and torch.equal(m, mask[:, -S:])


def test_recall_by_distance_reports_both_copies():
    model, src = tiny("rope", block_size=64, n_layer=2), random_docs(1, 2000)[0]
    out = ev.recall_by_distance(model, src, [6, 20], span_len=6, trials=3, prefix_len=8, batch_size=2)
    # recompute d=20 from the same probes with one full forward: copies at 8..13 and 28..33
    rng, vocab = np.random.default_rng([0, 20]), np.unique(src)
    idx = torch.stack([ev.recall_probe(src, 6, 20, rng, 8, "random", vocab)[0] for _ in range(3)])
    with torch.no_grad():
        logits = model(idx[:, :-1])[0]
    loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), idx[:, 1:], reduction="none")
    hit = (logits.argmax(-1) == idx[:, 1:]).float()
    r = out["by_distance"][1]
    assert r["n_tokens"] == 3 * 5 and r["n_probes"] == 3 and r["length"] == 34
    assert r["first_copy_loss"] == pytest.approx(loss[:, 8:13].mean().item(), rel=1e-4)
    assert r["loss"] == pytest.approx(loss[:, 28:33].mean().item(), rel=1e-4)
    assert r["first_copy_accuracy"] == pytest.approx(hit[:, 8:13].mean().item())
    assert r["accuracy"] == pytest.approx(hit[:, 28:33].mean().item())
    assert r["exact"] == pytest.approx((hit[:, 28:33] == 1).all(1).float().mean().item())


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from data.prepare import prepare
    root, out = tmp_path_factory.mktemp("text"), tmp_path_factory.mktemp("prepared")
    for i in range(10):
        (root / f"doc{i}.txt").write_text(" ".join(f"word{i}_{j % 97}" for j in range(60 + 40 * i)))
    prepare(str(root), out, val_fraction=0.4, quiet=True)
    return out


def test_evaluate_writes_every_number_and_marks_the_wall(corpus, tmp_path, monkeypatch):
    dynamic = GPT(tiny_config(block_size=32, vocab_size=50304, n_layer=1, n_head=2, rope_scaling=WHOLE_WINDOW["dynamic"]
                              | {"original_max_position_embeddings": 32})).eval()
    models = {"learned": tiny("learned", vocab_size=50304), "rope": tiny("rope", vocab_size=50304), "dyn": dynamic}
    res = evaluate.run_tasks(models, EvalConfig(data_dir=str(corpus), max_len=128, out_dir=str(tmp_path), n_docs=3,
                                               passkey_trials=1, recall_trials=2, span_len=4))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["base_len"] == 32 and set(saved["models"]) == {"learned", "rope", "dyn"}
    for r in saved["models"].values():
        assert set(ev.TASKS) <= set(r)
    assert [e["window"] for e in res["models"]["rope"]["ppl"]] == [32, 64, 128]
    assert "cannot_run" in res["models"]["learned"]["ppl"][1] and "ppl" in res["models"]["rope"]["ppl"][2]
    assert res["documents"]["n_docs"] == 3 and "TRAIN" not in res["documents"]["source"]
    md = (tmp_path / "summary.md").read_text()
    for heading in ("Loss by position", "Sliding-window perplexity", "Short-context loss", "Passkey", "recall"):
        assert heading in md
    assert "cannot run" in md and "learned positions stop at 32" in md
    # dynamic NTK's columns and rows are marked, and the note under each table says how they are scored
    assert "| dyn † |" in md and md.count("† dyn: the RoPE frequencies change with the length") == 2
    assert "rope †" not in md and "learned †" not in md
    flat = evaluate.scalars(res)
    assert "rope/ppl@128" in flat and "learned/ppl@128" not in flat and "learned/short_loss" in flat
    pytest.importorskip("matplotlib")
    assert all((tmp_path / f"{t}.png").stat().st_size > 0 for t in ("position", "ppl", "passkey", "recall"))
    # more models than a panel takes: drawn in groups, the scaled one beside the unscaled model of its scheme
    monkeypatch.setattr(plots, "PANEL_MODELS", 2)
    assert plots.model_groups(res, list(res["models"])) == [("as trained", ["learned", "rope"]),
                                                            ("scaled, no fine-tune", ["rope", "dyn"])]
    assert all(p.stat().st_size > 0 for p in plots.plot_all(res, tmp_path / "grouped"))


def test_model_groups_keep_every_panel_readable():
    """13 models (the schemes run): every model in a panel, none past PANEL_MODELS, and each scaled or
    fine-tuned model beside the unscaled model of its scheme."""
    trained = ["learned", "sinusoidal", "alibi", "rope", "none", "rope_nope", "t5", "kerple"]
    models = {k: {"pos_encoding": k, "block_size": 256, "rope_scaling": None} for k in trained}
    models |= {f"rope + {m} (no fine-tune)": {"pos_encoding": "rope", "block_size": 256, "rope_scaling": {"rope_type": m}}
               for m in ("linear", "ntk", "dynamic", "yarn")}
    models |= {f"rope + {m} fine-tuned": {"pos_encoding": "rope", "block_size": 1024, "rope_scaling": None}
               for m in ("PI", "YaRN")}
    results = {"models": models, "base_len": 256}
    groups = plots.model_groups(results, list(models))
    assert [title for title, _ in groups] == ["as trained (1/2)", "as trained (2/2)", "scaled, no fine-tune",
                                              "fine-tuned at 4L"]
    assert all(len(g) <= plots.PANEL_MODELS for _, g in groups)
    assert {k for _, g in groups for k in g} == set(models)
    assert all(g[0] == "rope" for title, g in groups if not title.startswith("as trained"))
    assert plots.model_groups(results, trained[:3]) == [("", trained[:3])]  # few enough: one panel


def test_cli_runs_a_checkpoint_and_fails_in_one_line(corpus, tmp_path, capsys):
    model = tiny("alibi", vocab_size=50304)
    ckpt = tmp_path / "alibi" / "ckpt.pt"
    ckpt.parent.mkdir()
    torch.save({"model": model.state_dict(), "config": {"model": dataclasses.asdict(model.config)},
                "format_version": 1, "step": 0}, ckpt)
    cli(evaluate.main, [f"--ckpt={ckpt}", f"--data_dir={corpus}", "--max_len=64", f"--out_dir={tmp_path / 'eval'}",
             "--tasks=position,ppl,short", "--n_docs=2", "--device=cpu"])
    out = capsys.readouterr()
    assert "| alibi |" in out.out and "[eval" in out.err
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["models"]["alibi"]["pos_encoding"] == "alibi"
    for argv, message in [([f"--ckpt={tmp_path / 'missing.pt'}"], "error: no checkpoint at"),
                          ([f"--data_dir={tmp_path / 'nodata'}"], "error: no prepared data"),
                          (["--tasks=position,wall"], "config key 'tasks': choose from position, ppl"),
                          (["--max_len=16"], "max_len=16 is shorter than the base length L=32"),
                          (["--max_len=0"], "config key 'max_len': expected a number >= 1"),
                          (["--recall_kind=words"], "config key 'recall_kind': expected random or text")]:
        with pytest.raises(SystemExit) as e:
            cli(evaluate.main, [f"--ckpt={ckpt}", f"--data_dir={corpus}", *argv])
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_training_documents_are_scored_only_when_asked(corpus, tmp_path):
    """Val has fewer long documents than asked: refused in one line that says how many it has and how to go on;
    with train_docs the train documents top them up, the note says so and the results record the flag."""
    val = long_documents(corpus, "val", 65)
    with pytest.raises(ValueError) as e:
        held_out_documents(corpus, 65, len(val) + 1)
    assert "\n" not in str(e.value) and f"has {len(val)} held-out (val) documents of >= 65 tokens" in str(e.value)
    assert "--train_docs=true" in str(e.value) and "--n_docs" in str(e.value)
    docs, note = held_out_documents(corpus, 65, len(val) + 1, train_docs=True)
    assert len(docs) == len(val) + 1 and all(np.array_equal(d, v) for d, v in zip(docs, val))
    assert not any(np.array_equal(docs[-1], v) for v in val) and "+ 1 TRAIN documents (not held out" in note
    models = {"rope": tiny("rope", vocab_size=50304)}
    cfg = EvalConfig(data_dir=str(corpus), max_len=64, out_dir="", tasks=("ppl",), n_docs=len(val) + 1)
    with pytest.raises(ValueError, match="--train_docs=true"):
        evaluate.run_tasks(models, cfg)
    res = evaluate.run_tasks(models, dataclasses.replace(cfg, train_docs=True))
    assert res["documents"]["train_docs"] and res["settings"]["train_docs"] and "TRAIN" in res["documents"]["source"]
    assert "train_docs" not in cfg.settings(32)  # off: the settings of results from before the flag, reused


def test_resume_reuses_only_unchanged_checkpoints_with_the_same_settings(corpus, tmp_path, monkeypatch):
    paths = {}
    for scheme in ("alibi", "rope"):
        model = tiny(scheme, vocab_size=50304)
        paths[scheme] = tmp_path / scheme / "ckpt.pt"
        paths[scheme].parent.mkdir()
        torch.save({"model": model.state_dict(), "config": {"model": dataclasses.asdict(model.config)},
                    "format_version": 1, "step": 0}, paths[scheme])
    evaluated = []
    real = ev.TASKS["short"]
    monkeypatch.setitem(ev.TASKS, "short", lambda model, data: evaluated.append(model) or real(model, data))
    run = lambda **kw: evaluate.run_tasks({s: str(p) for s, p in paths.items()}, EvalConfig(  # noqa: E731
        data_dir=str(corpus), max_len=64, out_dir=str(tmp_path / "eval"), tasks=("short",), resume=True, **kw))
    first = run()
    assert len(evaluated) == 2
    assert run()["models"] == first["models"] and len(evaluated) == 2  # nothing changed: nothing recomputed
    torch.save(torch.load(paths["rope"], weights_only=True) | {"step": 1}, paths["rope"])  # a new checkpoint
    run()
    assert len(evaluated) == 3 and evaluated[-1].config.pos_encoding == "rope"
    run(seed=1)  # another setting: every model again
    assert len(evaluated) == 5


# ----------------------------------------------------------------------------- length-dependent scaling

WHOLE_WINDOW = {  # RoPE scalings whose frequencies change with the length, at L = EXPORT_LEN, x4
    "dynamic": {"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": EXPORT_LEN},
    "longrope": {"rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": EXPORT_LEN,
                 "short_factor": [1.0, 1.2, 1.5, 2.0], "long_factor": [1.0, 2.0, 5.0, 9.0]},  # 4 rotated pairs
}


@pytest.mark.parametrize("rope_type", WHOLE_WINDOW)
@torch.no_grad()
def test_length_dependent_scaling_is_scored_with_the_whole_windows_frequencies(rope_type):
    """What the report says beside the dynamic NTK and LongRoPE rows. The evaluation's loss at each position of a 4L
    window is that of one forward over the whole window (ours and transformers' without a cache: every token gets
    the 4L frequencies), to fp32 rounding (1e-4 on losses near 10 from sharpened weights). It is not the loss of a
    forward over the token's own prefix (that length's frequencies: what our cached decoding gives), nor of
    transformers' cached decoding (each key keeps the frequencies of the length it was cached at): both differ by
    far more, and the two agree with each other below L, where no frequency has changed yet."""
    transformers = pytest.importorskip("transformers")
    from scripts import export_hf
    transformers.utils.logging.set_verbosity_error()
    model, L = random_export_model(WHOLE_WINDOW[rope_type]), EXPORT_LEN
    T = 4 * L
    doc = np.random.default_rng(0).integers(0, 50257, T + 1)
    scored = ev.loss_by_position(model, [doc], T, [(p, p + 1) for p in range(T)])  # one bucket per position
    evaluation = torch.tensor([b["mean"] for b in scored["buckets"]])
    x, y = torch.from_numpy(doc[:-1])[None], torch.from_numpy(doc[1:])

    def losses(logits):  # (T, vocab) -> (T,)
        return F.cross_entropy(logits.float(), y, reduction="none")

    hf = export_hf.to_hf(model)
    whole, hf_whole = losses(model(x)[0][0]), losses(hf(x).logits[0])
    prefix = losses(torch.stack([model(x[:, :t + 1], last_only=True)[0][0, -1] for t in range(T)]))
    out, steps = hf(x[:, :1], use_cache=True), []
    for t in range(1, T):
        steps.append(out.logits[0, -1])
        out = hf(x[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
    hf_cached = losses(torch.stack(steps + [out.logits[0, -1]]))
    assert_close(evaluation, whole, atol=1e-4, rtol=0)
    assert_close(evaluation, hf_whole, atol=1e-4, rtol=0)
    assert_close(hf_cached[:L], prefix[:L], atol=1e-4, rtol=0)  # below L: the same frequencies, the same model
    assert (evaluation - prefix).abs().max() > 1e-2 and (evaluation - hf_cached).abs().max() > 1e-2
    assert (hf_cached - prefix)[L:].abs().max() > 1e-2  # past L transformers' stale keys differ from fresh ones too


def test_check_decoding_prints_the_static_step_equal_to_the_reference(corpus, tmp_path, capsys):
    """scripts/check_decoding.py on a checkpoint: one row per mode, and the static fp32 step's greedy tokens are
    the cached forward's (the bf16 rows are only reported)."""
    from scripts import check_decoding
    model = tiny("alibi", vocab_size=50304)
    ckpt = tmp_path / "alibi" / "ckpt.pt"
    ckpt.parent.mkdir()
    torch.save({"model": model.state_dict(), "config": {"model": dataclasses.asdict(model.config)},
                "format_version": 1, "step": 0}, ckpt)
    check_decoding.main([f"--ckpt={ckpt}", f"--data_dir={corpus}", "--max_len=64", "--passkey_trials=1",
                         "--recall_trials=2", "--prompts=2", "--new_tokens=6", "--device=cpu"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| alibi |")]
    assert [r.split(" | ")[1] for r in rows][:2] == ["reference", "static fp32"]
    assert rows[1].split(" | ")[-2] == "2/2" and rows[1].split(" | ")[3] == rows[0].split(" | ")[3]
