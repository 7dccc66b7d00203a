"""The reproduction pipeline end to end at a toy scale: every stage runs, the report is written, and a
re-run skips what is finished."""

import json
import os
import signal

import pytest

import evaluate
import reproduce
from posenc import eval_tasks as tasks
from posenc.cli import Interrupted
from posenc.data import BatchSampler


@pytest.fixture
def tiny_scale(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(17):  # documents longer than the evaluation length (8 x 16 = 128 tokens); 2 in val (doc8, doc16)
        (corpus / f"doc{i}.txt").write_text(" ".join(f"w{(i * 7 + j) % 50}" for j in range(300)))
    model = {"block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 16, "batch_size": 4, "max_iters": 3,
             "eval_interval": 3, "eval_iters": 1, "ckpt_interval": 3, "log_interval": 1, "warmup_iters": 1}
    return reproduce.Scale(config="cpu", data_dir=str(tmp_path / "data"), vocab_size=256, base_len=16, train=model,
                           extend_steps=2, extend={"eval_interval": 2, "eval_iters": 1}, source=str(corpus),
                           eval=dict(n_docs=2, passkey_trials=1, recall_trials=1, tasks=("position", "ppl", "short")))


def test_pipeline_runs_every_stage_and_resumes(tiny_scale, tmp_path, capsys):
    run_dir = tmp_path / "run"
    report = reproduce.run(tiny_scale, run_dir).read_text()
    stages = json.loads((run_dir / "stages.json").read_text())
    assert set(stages) == stage_names(1337)
    assert "**learned**: cannot run past 16 tokens" in report
    for label in reproduce.models_to_evaluate(tiny_scale, run_dir):
        assert f"**{label}**" in report
    assert "relative to **rope + PI fine-tuned**" in report  # the default reference: the first fine-tuned model
    assert "One seed: there is no spread" in report
    assert report.startswith("# The wall and the rescue") and "![The wall and the rescue](headline.png)" in report
    assert (run_dir / "headline.png").exists() and "## Beside the papers" in report
    assert "## Why (explain.py)" in report and "[attention](seed1337/explain/rope/attention.png)" in report
    train_rope = stages["train rope (seed 1337)"]["result"]
    assert train_rope["steps"] == 3 and train_rope["tokens"] == 3 * 4 * 16  # steps x batch x block_size
    assert (run_dir / "eval" / "results.json").exists()
    capsys.readouterr()
    reproduce.run(tiny_scale, run_dir)  # a second run: every stage is skipped
    out = capsys.readouterr().out
    assert out.count("skipped") == len(stages)


def stage_names(*seeds):
    return {"data"} | {name for s in seeds for name in (
        *(f"train {scheme} (seed {s})" for scheme in reproduce.DEFAULT_SCHEMES), f"fine-tune rope with PI (seed {s})",
        f"fine-tune rope with YaRN (seed {s})", f"evaluate (seed {s})",
        *(f"explain {label} (seed {s})" for label in ("rope", "rope + PI fine-tuned", "rope + YaRN fine-tuned")))}


def test_more_seeds_add_runs_and_every_cell_gets_a_spread(tiny_scale, tmp_path, capsys):
    run_dir = tmp_path / "run"
    reproduce.run(tiny_scale, run_dir)
    capsys.readouterr()
    report = reproduce.run(tiny_scale, run_dir, seeds=2).read_text()
    assert capsys.readouterr().out.count("skipped") == len(stage_names(1337))  # seed 1337 is not trained again
    assert set(json.loads((run_dir / "stages.json").read_text())) == stage_names(1337, 1338)
    merged = json.loads((run_dir / "eval" / "results.json").read_text())
    per_seed = [json.loads((run_dir / f"seed{s}" / "eval" / "results.json").read_text()) for s in (1337, 1338)]
    assert merged["n_seeds"] == 2
    a, b = (r["models"]["rope"]["ppl"][0]["ppl"] for r in per_seed)
    assert a != b  # another seed trains another model
    assert merged["models"]["rope"]["ppl"][0]["ppl"] == pytest.approx((a + b) / 2)
    assert merged["models"]["rope"]["ppl"][0]["ppl_sd"] == pytest.approx(abs(a - b) / 2 ** 0.5)
    assert "Which differences exceed the seed spread (2 seeds)" in report
    assert "The claims against the seed spread (2 seeds)" in report
    n_models = len(reproduce.models_to_evaluate(tiny_scale, run_dir))
    pairs = [ln for ln in report.splitlines() if ln.startswith("| ") and ln.count("| yes ") + ln.count("| no ") > 0]
    assert len(pairs) >= n_models * (n_models - 1) // 2 - (n_models - 1)  # pairs with learned past L: cannot run
    assert "± " in report.split("## Sliding-window perplexity")[1].split("##")[0]
    # a rescue added to both seeds (Self-Extend: evaluated only): its table and reading give the spread too
    table = reproduce.run(tiny_scale, run_dir, seeds=2, rescues=("self_extend",)).read_text().split(
        "## Every rescue, side by side")[1].split("## ")[0]
    row = next(ln for ln in table.splitlines() if ln.startswith(f"| {reproduce.RESCUES['self_extend'].label} |"))
    assert row.count(" ± ") == 4  # ppl at L, 2L, 4L, 8L
    reading = [ln for ln in table.splitlines() if ln.startswith("- At ")]
    assert reading and all(("(beyond the spread)" in ln) != ("(within it)" in ln) and " ± " in ln for ln in reading)


def test_seeds_are_merged_relative_to_one_reference(tiny_scale, tmp_path):
    """A seed evaluated with another reference (its default follows the order of its models, which a later run
    may change) is put back on the run's reference before the seeds are merged: never a mean of differences
    against different models."""
    run_dir = tmp_path / "run"
    reproduce.run(tiny_scale, run_dir, seeds=2)
    pi = reproduce.tuned_label("linear")
    path = run_dir / "seed1338" / "eval" / "results.json"
    stale = json.loads(path.read_text())
    evaluate.add_relative(stale, "rope")  # as if this seed's evaluation had another default reference
    stale["reference"] = "rope"
    path.write_text(json.dumps(stale))
    reproduce.run(tiny_scale, run_dir, seeds=2)  # every stage done: only the merge and the report again
    merged = json.loads((run_dir / "eval" / "results.json").read_text())
    assert merged["reference"] == pi
    per_seed = [json.loads((run_dir / f"seed{s}" / "eval" / "results.json").read_text()) for s in (1337, 1338)]
    want = [[b["mean"] for b in tasks.relative_loss(r["models"]["rope"]["position"], r["models"][pi]["position"])]
            for r in per_seed]
    got = [b["mean"] for b in merged["models"]["rope"]["position"]["relative"]]
    assert got == pytest.approx([(x + y) / 2 for x, y in zip(*want)])


def test_claims_call_a_rise_real_only_beyond_the_spread():
    def ppl(*cells):  # (window, mean, std) -> merged sliding-window entries
        return [{"window": w, "ppl": m, "ppl_sd": sd} for w, m, sd in cells]
    results = {"base_len": 16, "n_seeds": 3, "models": {
        "rope": {"ppl": ppl((16, 10.0, 0.2), (64, 13.0, 0.3))},  # rises by 3.0, spread 0.5: the wall
        "alibi": {"ppl": ppl((16, 10.0, 0.2), (64, 10.3, 0.2))},  # rises by 0.3, spread 0.4: flat
        "rope + PI fine-tuned": {"ppl": ppl((16, 10.5, 0.1), (64, 10.6, 0.1))},
        "learned": {"ppl": [{"window": 16, "ppl": 12.0, "ppl_sd": 0.1}, {"window": 64, "cannot_run": "too long"}]}}}
    cells = [[c.strip() for c in ln.split("|")[1:-1]] for ln in reproduce.claims(results)
             if ln.startswith("| ") and not ln.startswith("| model")]
    rows = {c[0]: c[1:] for c in cells}
    assert rows["rope"] == ["1.30× (beyond)", ""]
    assert rows["alibi"] == ["1.03× (within)", "0.79× (beyond)"]
    assert rows["rope + PI fine-tuned"] == ["1.01× (within)", "0.82× (beyond)"]
    assert rows["learned"] == ["cannot run", "cannot run"]
    assert reproduce.claims(results | {"n_seeds": 1}) == []  # one seed: no spread, no verdict


def test_parallel_workers_reproduce_the_same_numbers(tiny_scale, tmp_path, threads_of_a_worker_slot):
    """The default command's path: runs as subprocesses, two at once, fine-tunes after the RoPE training. With
    the same thread count per run, the same seeds give the same models: every number is equal."""
    reproduce.run(tiny_scale, tmp_path / "one")
    reproduce.run(tiny_scale, tmp_path / "two", workers=2)
    one, two = flat(evaluation(tmp_path / "one")[0]), flat(evaluation(tmp_path / "two")[0])
    assert two.keys() == one.keys()
    assert two == one


def flat(x, path=""):
    """{path: leaf} of a nested dict/list, numbers only (what pytest.approx compares)."""
    if isinstance(x, dict):
        return {k: v for key, value in x.items() for k, v in flat(value, f"{path}/{key}").items()}
    if isinstance(x, list):
        return {k: v for i, value in enumerate(x) for k, v in flat(value, f"{path}[{i}]").items()}
    return {path: x} if isinstance(x, (int, float)) and not isinstance(x, bool) else {}


def evaluation(run_dir):
    """Every number of the evaluation, without what names the files it came from."""
    results = json.loads((run_dir / "seed1337" / "eval" / "results.json").read_text())
    for r in results["models"].values():
        r.pop("checkpoint_id")
    return results["models"], (run_dir / "seed1337" / "eval" / "summary.md").read_text()


def test_an_interrupted_reproduction_resumes_to_the_same_results(tiny_scale, tmp_path, monkeypatch):
    reproduce.run(tiny_scale, tmp_path / "reference")
    run_dir, original = tmp_path / "run", BatchSampler.next

    def stop_training(block_size, at_call):  # SIGTERM in the middle of a training step at that length
        calls = []

        def next_(self):
            if self.split == "train" and self.block_size == block_size:
                calls.append(1)
                if len(calls) == at_call:
                    os.kill(os.getpid(), signal.SIGTERM)
            return original(self)
        return next_

    def stages():
        return set(json.loads((run_dir / "stages.json").read_text()))

    monkeypatch.setattr(BatchSampler, "next", stop_training(16, 2))  # training the first scheme
    with pytest.raises(Interrupted):
        reproduce.run(tiny_scale, run_dir)
    assert stages() == {"data"}
    monkeypatch.setattr(BatchSampler, "next", stop_training(64, 1))  # fine-tuning at 4 x 16
    with pytest.raises(Interrupted):
        reproduce.run(tiny_scale, run_dir)
    assert stages() == {"data", "train rope (seed 1337)"}  # the fine-tunes follow the model they start from
    monkeypatch.setattr(BatchSampler, "next", original)
    ppl, calls = tasks.TASKS["ppl"], []

    def ctrl_c_on_the_third_model(model, data):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return ppl(model, data)

    monkeypatch.setitem(tasks.TASKS, "ppl", ctrl_c_on_the_third_model)
    with pytest.raises(KeyboardInterrupt):
        reproduce.run(tiny_scale, run_dir)
    assert "evaluate (seed 1337)" not in stages() and "fine-tune rope with YaRN (seed 1337)" in stages()
    monkeypatch.setitem(tasks.TASKS, "ppl", ppl)
    reproduce.run(tiny_scale, run_dir)
    assert evaluation(run_dir) == evaluation(tmp_path / "reference")


def test_nonoverlapping_perplexity_joins_the_report_and_the_papers_comparison(tiny_scale, tmp_path):
    """--nonoverlapping=true: one more stage per seed (the ppl task alone, Press et al.'s windows), merged over seeds
    in eval_nonoverlapping/; its table, titled by the mode, is in the report beside the sliding one, and the
    comparison with the papers uses it."""
    run_dir = tmp_path / "run"
    report = reproduce.run(tiny_scale, run_dir, nonoverlapping=True).read_text()
    stages = json.loads((run_dir / "stages.json").read_text())
    assert "non-overlapping perplexity (seed 1337)" in stages
    disjoint = json.loads((run_dir / reproduce.NONOVERLAPPING / "results.json").read_text())
    sliding = json.loads((run_dir / "eval" / "results.json").read_text())
    for results, mode in ((disjoint, "nonoverlapping"), (sliding, "sliding")):
        assert {e["mode"] for m in results["models"].values() for e in m["ppl"]} == {mode}
    tables = report.split("## Non-overlapping-window perplexity")[1]
    disjoint_table, sliding_table = tables.split("## Sliding-window perplexity")
    assert "(eval_nonoverlapping/ppl.png)" in disjoint_table and "W=32 (2L, S=32)" in disjoint_table
    assert "(eval/ppl.png)" in sliding_table and "W=32 (2L, S=16)" in sliding_table
    papers = report.split("## Beside the papers")[1].split("\n## ")[0]
    assert "Ours: windows of W tokens that do not overlap" in papers and "do not overlap;" in papers
    rope = {e["window"]: e["ppl"] for e in disjoint["models"]["rope"]["ppl"]}
    assert f"{rope[32] / rope[16]:.2f}" in papers  # the ratio at 2L is the non-overlapping one


def test_schemes_add_to_the_default_five_or_replace_them(tmp_path):
    from posenc.config import parse
    five = ("learned", "sinusoidal", "alibi", "rope", "none")
    assert parse(reproduce.ReproduceConfig, []).schemes == reproduce.DEFAULT_SCHEMES == five
    added = parse(reproduce.ReproduceConfig, ["--schemes=+rope_nope,t5"]).schemes
    assert added == (*reproduce.DEFAULT_SCHEMES, "rope_nope", "t5")
    assert parse(reproduce.ReproduceConfig, ["--schemes=rope,alibi"]).schemes == ("rope", "alibi")
    models = reproduce.models_to_evaluate(reproduce.load_scale(reproduce.presets()["cpu"]), tmp_path, added)
    assert models["t5"] == str(tmp_path / "t5" / "ckpt.pt") and "rope_nope" in models
    for flag, words in [("--schemes=+rotary", "bad value 'rotary' for config key 'schemes'"),
                        ("--schemes=alibi", "must include rope")]:
        with pytest.raises(ValueError, match=words):
            parse(reproduce.ReproduceConfig, [flag])


def test_rescues_all_adds_every_recipe_and_the_rescue_table(tiny_scale, tmp_path):
    """--rescues=all: the direct control, ABF, PoSE and DroPE train with the fine-tunes' steps, Self-Extend is
    evaluated training-free, LongRoPE's factors are searched, and one table holds every rescue with its steps,
    tokens and seconds."""
    cfg = reproduce.ReproduceConfig(rescues=("all",))
    assert cfg.rescues == tuple(reproduce.RESCUES)
    run_dir = tmp_path / "run"
    report = reproduce.run(tiny_scale, run_dir, rescues=cfg.rescues).read_text()
    stages = json.loads((run_dir / "stages.json").read_text())
    trained = [r for r in reproduce.RESCUES.values() if r.fine_tuned]
    evaluated = f"evaluate (seed 1337) with {', '.join(reproduce.RESCUES)}"  # its own stage: a later run adds them
    assert set(stages) == stage_names(1337) - {"evaluate (seed 1337)"} | {evaluated} | {
        f"rescue {r.label} (seed 1337)" for r in trained} | {"search LongRoPE factors (seed 1337)"}
    table = report.split("## Every rescue, side by side")[1].split("## ")[0]
    whole_window = {reproduce.RESCUES["longrope"].label, reproduce.RESCUES["longrope_tuned"].label,
                    reproduce.free_label("dynamic")}  # marked: scored with the whole window's frequencies
    note = next(ln for ln in table.splitlines() if ln.startswith("† "))
    assert "the RoPE frequencies change with the length" in note and all(label in note for label in whole_window)
    for r in reproduce.RESCUES.values():
        row = next(ln for ln in table.splitlines()
                   if ln.startswith(f"| {r.label}{' †' if r.label in whole_window else ''} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert all(cells[1:5]) and "cannot run" not in cells[1:5], row  # ppl at L, 2L, 4L, 8L
        steps, tokens = int(cells[6]), int(cells[7].replace(",", ""))
        assert (steps, tokens > 0) == ((2, True) if r.fine_tuned else (0, False)), row
    assert (run_dir / "rescues.png").exists() and "![Every rescue, one per panel](rescues.png)" in table
    reading = [ln for ln in table.splitlines() if ln.startswith("- At ")]  # one line per window: 4L, then 8L
    assert len(reading) == 2 and all(f"{reproduce.RESCUES[r].label.removeprefix('rope + ')} " in ln
                                     for ln in reading for r in reproduce.RESCUES)
    pose = next(ln for ln in table.splitlines() if ln.startswith(f"| {reproduce.RESCUES['pose'].label} |"))
    pi = next(ln for ln in table.splitlines() if ln.startswith("| rope + PI fine-tuned |"))
    assert pose.split("|")[-3] == pi.split("|")[-3]  # PoSE and full-length PI: equal steps, equal tokens
    drope = json.loads((run_dir / "seed1337" / "rope_drope_ft" / "config.json").read_text())["config"]["model"]
    assert drope["pos_encoding"] == "none"


def test_a_bad_rescue_name_is_one_line():
    with pytest.raises(ValueError, match="bad value 'pse' for config key 'rescues': choose all, or some of direct"):
        reproduce.ReproduceConfig(rescues=("pse",))


def test_opt_in_longrope_row_searches_and_is_evaluated(tiny_scale, tmp_path):
    run_dir = tmp_path / "run"
    report = reproduce.run(tiny_scale, run_dir, rescues=("longrope",)).read_text()
    stages = json.loads((run_dir / "stages.json").read_text())
    assert set(stages) == stage_names(1337) - {"evaluate (seed 1337)"} | {
        "evaluate (seed 1337) with longrope", "search LongRoPE factors (seed 1337)"}
    assert "**rope + LongRoPE searched (no fine-tune)**" in report
    search = json.loads((run_dir / "seed1337" / reproduce.rescue_folder("longrope") / "extension.json").read_text())["search"]
    assert search["loss"] <= min(search["start_losses"].values())
