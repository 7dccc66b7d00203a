"""The reproduction pipeline end to end at a toy scale: every stage runs, the report is written, and a
re-run skips what is finished."""

import json
import os
import signal

import pytest

import reproduce
import tasks
from config import Interrupted
from data.loader import BatchSampler


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


def evaluation(run_dir):
    """Every number of the evaluation, without what names the files it came from."""
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    for r in results["models"].values():
        r.pop("checkpoint_id")
    return results["models"], (run_dir / "eval" / "summary.md").read_text()


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
    assert stages() == {"data", *(f"train {s}" for s in reproduce.SCHEMES)}
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
    assert "evaluate" not in stages() and "fine-tune rope with YaRN" in stages()
    monkeypatch.setitem(tasks.TASKS, "ppl", ppl)
    reproduce.run(tiny_scale, run_dir)
    assert evaluation(run_dir) == evaluation(tmp_path / "reference")
