"""scripts/sweep.py: the grid, resuming an interrupted sweep, and the statistics (checked against hand computations)."""
import json
import math
import os
import signal
import sysconfig

import pytest

import evaluate
from data.prepare import prepare
from posenc import eval_tasks as tasks
from posenc import jobs, run_stats
from posenc.cli import Interrupted
from posenc.config import ConfigError
from posenc.data import BatchSampler
from scripts import sweep

TINY = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=2", "--max_iters=4",
        "--warmup_iters=1", "--eval_iters=1", "--eval_interval=2", "--ckpt_interval=2", "--log_interval=1",
        "--device=cpu"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    prepare(os.path.join(sysconfig.get_paths()["stdlib"], "email", "*.py"), out, val_fraction=0.2, quiet=True)
    return str(out)


def argv(data_dir, sweep_dir, *extra):
    return [f"--data_dir={data_dir}", f"--sweep_dir={sweep_dir}", *TINY, "--eval_docs=2", "--eval_tasks=ppl,short",
            "--workers=1", *extra]  # in this process: the tests patch it


# ----------------------------------------------------------------------------- the grid

def test_commas_make_axes_and_the_grid_is_every_combination():
    axes, fixed = sweep.split_grid(["--pos_encoding=rope,alibi", "--rope_theta=1e4,5e5", "--seed=0,1,2",
                                    "--max_iters=3", '--rope_scaling={"rope_type": "linear", "factor": 2}'])
    assert axes == {"pos_encoding": ["rope", "alibi"], "rope_theta": ["1e4", "5e5"], "seed": ["0", "1", "2"]}
    assert fixed == ["--max_iters=3", '--rope_scaling={"rope_type": "linear", "factor": 2}']  # a dict is never split
    grid = sweep.expand(axes)
    assert len(grid) == 12 and len({tuple(g.items()) for g in grid}) == 12
    assert grid[0] == {"pos_encoding": "rope", "rope_theta": "1e4", "seed": "0"}
    assert grid[1] == {"pos_encoding": "rope", "rope_theta": "1e4", "seed": "1"}  # the last axis varies fastest
    assert grid[-1] == {"pos_encoding": "alibi", "rope_theta": "5e5", "seed": "2"}
    assert sweep.run_name(grid[0]) == "pos_encoding=rope__rope_theta=1e4__seed=0"
    assert sweep.run_name(grid[0], skip=("seed",)) == "pos_encoding=rope__rope_theta=1e4"
    assert sweep.expand({}) == [{}]


def test_every_run_is_checked_before_anything_trains(data_dir, tmp_path):
    axes, fixed = sweep.split_grid(["--pos_encoding=rope,alibi", "--n_head=2,3", "--n_embd=16", "--device=cpu"])
    with pytest.raises(ConfigError, match="n_embd"):  # 16 is not divisible by 3 heads
        sweep.plan(None, fixed, axes, tmp_path / "s")
    assert not (tmp_path / "s").exists()
    runs = sweep.plan(None, [f"--data_dir={data_dir}"], {"pos_encoding": ["rope", "alibi"], "seed": ["0", "1"]},
                      tmp_path / "s")
    assert [r.setting for r in runs] == ["pos_encoding=rope"] * 2 + ["pos_encoding=alibi"] * 2
    assert [r.cfg.seed for r in runs] == [0, 1, 0, 1] and runs[2].cfg.model.pos_encoding == "alibi"
    assert runs[3].dir == tmp_path / "s" / "pos_encoding=alibi__seed=1"


# ----------------------------------------------------------------------------- statistics

def test_aggregate_is_mean_sample_std_and_n():
    a = run_stats.aggregate([1.0, 2.0, 4.0, None, float("nan")])
    assert a["n"] == 3 and a["mean"] == pytest.approx(7 / 3)
    assert a["std"] == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    assert run_stats.aggregate([5.0]) == {"mean": 5.0, "std": None, "n": 1}
    assert run_stats.aggregate([]) == {"mean": None, "std": None, "n": 0}


def test_summary_groups_seeds_by_setting():
    def rec(setting, seed, loss, ppl):
        return {"name": f"{setting}__seed={seed}", "setting": setting, "values": {"seed": seed}, "steps": 10,
                "tokens": 640, "train_seconds": 2.0, "numbers": {"val_loss": loss, "ppl@16": ppl}}
    summary = sweep.summarize([rec("a", 0, 3.0, 20.0), rec("b", 0, 2.0, 9.0), rec("a", 1, 4.0, 22.0),
                               rec("b", 1, 2.5, 11.0), rec("b", 2, 3.0, 13.0)])
    assert list(summary) == ["a", "b"] and summary["b"]["seeds"] == [0, 1, 2]
    assert summary["a"]["numbers"]["val_loss"] == {"mean": 3.5, "std": pytest.approx(math.sqrt(0.5)), "n": 2}
    assert summary["b"]["numbers"]["ppl@16"] == {"mean": 11.0, "std": pytest.approx(2.0), "n": 3}
    assert summary["b"]["tokens"]["mean"] == 640
    md = sweep.sweep_markdown(summary, "t")
    assert "| b | 0,1,2 |" in md and "11.00 ± 2.00 (3)" in md


def test_a_difference_is_real_only_beyond_the_seed_spread():
    assert run_stats.differs({"mean": 20.0, "std": 0.4}, {"mean": 21.0, "std": 0.5}) is True
    assert run_stats.differs({"mean": 20.0, "std": 0.6}, {"mean": 21.0, "std": 0.5}) is False
    assert run_stats.differs({"mean": 20.0, "std": None}, {"mean": 30.0, "std": 0.5}) is None  # one seed: no verdict


def test_merge_seeds_averages_every_float_and_keeps_the_rest():
    def results(ppl, loss):
        return {"base_len": 16, "models": {"m": {"ppl": [{"window": 16, "ppl": ppl, "n_tokens": 100},
                                                         {"window": 32, "cannot_run": "no"}],
                                                 "short": {"loss": loss, "base_len": 16},
                                                 "rope_scaling": {"factor": 4.0}}}}
    merged = run_stats.merge_seeds([results(10.0, 2.0), results(14.0, 3.0), results(12.0, 4.0)])
    e = merged["models"]["m"]["ppl"][0]
    assert e["ppl"] == pytest.approx(12.0) and e["ppl_sd"] == pytest.approx(2.0)
    assert e["window"] == 16 and e["n_tokens"] == 100 and "window_sd" not in e  # counts are not averaged
    assert merged["models"]["m"]["ppl"][1] == {"window": 32, "cannot_run": "no"}
    assert merged["models"]["m"]["short"]["loss_sd"] == pytest.approx(1.0) and merged["n_seeds"] == 3
    assert merged["models"]["m"]["rope_scaling"] == {"factor": 4.0}  # a config, not a number to average


def test_relative_loss_is_the_per_document_difference():
    model = {"buckets": [{"lo": 0, "hi": 4, "doc_means": [3.0, 5.0, 4.0]},
                         {"lo": 4, "hi": 8, "doc_means": [2.0, 2.5, 3.0]},
                         {"lo": 8, "hi": 16, "cannot_run": "table ends"}]}
    reference = {"buckets": [{"lo": 0, "hi": 4, "doc_means": [2.0, 4.5, 4.0]},
                             {"lo": 4, "hi": 8, "doc_means": [2.5, 2.5, 2.5]},
                             {"lo": 8, "hi": 16, "doc_means": [1.0, 1.0, 1.0]}]}
    rows = tasks.relative_loss(model, reference)
    assert rows[0]["mean"] == pytest.approx(0.5) and rows[0]["std"] == pytest.approx(0.5)  # diffs 1, 0.5, 0
    assert rows[1]["mean"] == pytest.approx(0.0) and rows[1]["std"] == pytest.approx(0.5)  # -0.5, 0, 0.5
    assert rows[2] == {"lo": 8, "hi": 16, "cannot_run": "table ends"}
    assert all(r["mean"] == 0 for r in tasks.relative_loss(reference, reference))


def test_the_default_reference_is_the_first_extended_model():
    def model(block, trained):
        return {"block_size": block, "training_length": trained,
                "position": {"buckets": [{"lo": 0, "hi": 4, "doc_means": [float(block)]}]}}
    results = {"models": {"rope": model(16, 16), "pi": model(64, 16), "yarn": model(64, 16)}}
    assert evaluate.add_relative(results) == "pi"
    assert results["models"]["rope"]["position"]["relative"][0]["mean"] == -48.0
    assert evaluate.add_relative(results, "yarn") == "yarn"
    assert evaluate.add_relative({"models": {"rope": model(16, 16), "alibi": model(16, 16)}}) is None


# ----------------------------------------------------------------------------- running

def test_an_interrupted_sweep_skips_finished_runs_and_resumes_the_rest(data_dir, tmp_path, monkeypatch, capsys):
    grid = ["--pos_encoding=rope,alibi", "--seed=0,1"]
    straight = sweep.main(argv(data_dir, tmp_path / "straight", *grid))
    original, calls = BatchSampler.next, []

    def sigterm_in_the_third_run(self):
        if self.split == "train":
            calls.append(1)
            if len(calls) == 2 * 4 + 3:  # two runs of 4 steps, then the third step of the third run
                os.kill(os.getpid(), signal.SIGTERM)
        return original(self)

    monkeypatch.setattr(BatchSampler, "next", sigterm_in_the_third_run)
    with pytest.raises(Interrupted):
        sweep.main(argv(data_dir, tmp_path / "s", *grid))
    third = tmp_path / "s" / "pos_encoding=alibi__seed=0"
    assert (third / "ckpt.pt").exists() and not (third / sweep.RECORD).exists()  # checkpointed, not finished
    monkeypatch.setattr(BatchSampler, "next", original)
    capsys.readouterr()
    resumed = sweep.main(argv(data_dir, tmp_path / "s", *grid))
    out = capsys.readouterr().out
    assert out.count("finished in an earlier sweep, skipped") == 2
    numbers = lambda summary: {k: v["numbers"] for k, v in summary.items()}  # noqa: E731  (not the timings)
    assert numbers(resumed) == numbers(straight)  # the same numbers as the sweep that was never stopped
    metrics = [json.loads(ln) for ln in (third / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m["kind"] == "train"] == [1, 2, 3, 4]


def test_a_finished_sweep_grows_by_new_values(data_dir, tmp_path, capsys):
    sweep.main(argv(data_dir, tmp_path / "s", "--seed=0,1"))
    capsys.readouterr()
    summary = sweep.main(argv(data_dir, tmp_path / "s", "--seed=0,1,2"))
    assert capsys.readouterr().out.count("skipped") == 2
    assert summary["all"]["numbers"]["val_loss"]["n"] == 3
    with pytest.raises(sweep.RunFolderError, match="holds another sweep"):  # other fixed flags: another sweep
        sweep.main(argv(data_dir, tmp_path / "s", "--seed=0,1", "--learning_rate=1e-2"))


@pytest.mark.slow
def test_parallel_workers_give_the_sequential_numbers(data_dir, tmp_path, threads_of_a_worker_slot):
    grid = ["--pos_encoding=rope,alibi"]
    one = sweep.main(argv(data_dir, tmp_path / "one", *grid))
    two = sweep.main(argv(data_dir, tmp_path / "two", *grid, "--workers=2"))  # two subprocesses, as many threads
    for setting in one:
        assert two[setting]["numbers"] == one[setting]["numbers"], setting  # the same models: equal numbers


def test_a_job_whose_dependency_failed_does_not_run(tmp_path, capsys):
    import train
    calls = []
    record = calls.append  # a stand-in stage: records its argv
    todo = [jobs.Job("a", [(train.main, ["--batch_size=0"])]),  # fails: a bad value
            jobs.Job("b", [(record, ["b"])], after=("a",)),
            jobs.Job("c", [(record, ["c"])], on_done=lambda s: calls.append(["c done"]))]
    assert jobs.run_jobs(todo, workers=1) == ["a", "b"]
    assert calls == [["c"], ["c done"]]
    assert "b not run: a failed" in capsys.readouterr().err


def test_the_runs_of_a_sweep_share_a_wandb_group(data_dir, tmp_path, monkeypatch):
    import train
    groups = []
    monkeypatch.setattr(train, "start_wandb", lambda *a, group=None, **k: groups.append(group))
    sweep.main(argv(data_dir, tmp_path / "ablation", "--seed=0,1", "--evaluate=false", "--wandb=offline"))
    assert groups == ["ablation", "ablation"]
