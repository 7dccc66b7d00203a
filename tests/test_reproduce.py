"""The reproduction pipeline end to end at a toy scale: every stage runs, the report is written, and a
re-run skips what is finished."""

import json

import pytest

import reproduce


@pytest.fixture
def tiny_scale(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):  # documents longer than the evaluation length (8 x 16 = 128 tokens)
        (corpus / f"doc{i}.txt").write_text(" ".join(f"w{(i * 7 + j) % 50}" for j in range(300)))
    model = {"block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 16, "batch_size": 4, "max_iters": 3,
             "eval_interval": 3, "eval_iters": 1, "ckpt_interval": 3, "log_interval": 1, "warmup_iters": 1}
    return reproduce.Scale("cpu", str(tmp_path / "data"), 256, 16, train=model, extend_steps=2,
                           extend={"eval_interval": 2, "eval_iters": 1}, source=str(corpus),
                           eval=dict(n_docs=2, passkey_trials=1, recall_trials=1, tasks=("position", "ppl", "short")))


def test_pipeline_runs_every_stage_and_resumes(tiny_scale, tmp_path, capsys):
    run_dir = tmp_path / "run"
    report = reproduce.run(tiny_scale, run_dir).read_text()
    stages = json.loads((run_dir / "stages.json").read_text())
    assert set(stages) == {"data", *(f"train {s}" for s in reproduce.SCHEMES), "fine-tune rope with PI",
                           "fine-tune rope with YaRN", "evaluate"}
    assert "**learned**: cannot run past 16 tokens" in report
    for label in reproduce.models_to_evaluate(tiny_scale, run_dir):
        assert f"**{label}**" in report
    assert (run_dir / "eval" / "results.json").exists()
    capsys.readouterr()
    reproduce.run(tiny_scale, run_dir)  # a second run: every stage is skipped
    out = capsys.readouterr().out
    assert out.count("skipped") == len(stages)
