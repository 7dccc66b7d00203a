"""A scale is a TOML file (reproduce.py): the presets in configs/ are the scales that were once a dict in the code,
a user's file runs the whole experiment with flags over it, and a file the corpus or the scripts cannot serve is
refused in one line before any training."""
import json
import shutil

import pytest
from conftest import error_line

import reproduce
from reproduce import Scale

# The presets as they were in reproduce.py's SCALES dict before they became files (commit 4402f08); the GPU
# scale has since moved to the folder corpus, for its 32k held-out documents.
CPU_EVAL = dict(n_docs=8, passkey_trials=1, recall_trials=8)
BEFORE = {
    "cpu": Scale(config="cpu", data_dir="data/stdlib4k", vocab_size=4096, base_len=256, extend_steps=500,
                 train={"max_iters": 1750, "eval_interval": 350, "ckpt_interval": 350, "log_interval": 50},
                 extend={"learning_rate": 1e-3, "eval_interval": 75, "eval_iters": 4}, eval=CPU_EVAL),
    "cpu-quick": Scale(config="cpu", data_dir="data/stdlib4k", vocab_size=4096, base_len=256, extend_steps=150,
                       train={"max_iters": 250, "eval_interval": 125, "ckpt_interval": 125, "log_interval": 50},
                       extend={"learning_rate": 1e-3, "eval_interval": 75, "eval_iters": 4},
                       eval=CPU_EVAL | {"n_docs": 4}),
    "gpu": Scale(config="gpu30m", data_dir="data/stdlib-folders", documents="folders", vocab_size=None,
                 base_len=4096, extend_steps=100,
                 extend={"learning_rate": 2e-4, "eval_interval": 50, "eval_iters": 4, "compile": True},
                 eval=dict(n_docs=8, passkey_trials=2, recall_trials=8)),
}

# A toy scale (tests/test_reproduce.py's) as a file: 16-token windows, evaluated to 8 x 16 = 128 tokens.
TOY = """config = "cpu"
data_dir = "{data}"
source = "{source}"
vocab_size = 256
base_len = 16
extend_steps = 2

[train]
block_size = 16
n_layer = 1
n_head = 2
n_embd = 16
batch_size = 4
max_iters = 3

[eval]
n_docs = 2
tasks = ["position", "ppl", "short"]
"""


@pytest.fixture
def toy(tmp_path):
    """(a toy scale file, its corpus: 17 documents of ~600 tokens, 2 in val, not prepared yet)."""
    source = tmp_path / "text"
    source.mkdir()
    for i in range(17):  # doc8 and doc16 fall in val (data/prepare.py's hash split)
        (source / f"doc{i}.txt").write_text(" ".join(f"w{(i * 7 + j) % 50}" for j in range(300)))
    path = tmp_path / "toy.toml"
    path.write_text(TOY.format(data=tmp_path / "data", source=source))
    return path


def scale_and_run_dir(argv, monkeypatch):
    """What `python reproduce.py <argv>` would run: its scale and run folder (the stages themselves not run)."""
    monkeypatch.setattr(reproduce, "run", lambda scale, run_dir, *args: (scale, run_dir))
    return reproduce.main(argv)


@pytest.mark.parametrize("name", BEFORE)
def test_each_preset_file_loads_to_the_scale_it_replaced(name, monkeypatch):
    assert reproduce.load_scale(reproduce.presets()[name]) == BEFORE[name]
    scale, run_dir = scale_and_run_dir([f"--scale={name}"] if name != "cpu" else [], monkeypatch)
    assert scale == BEFORE[name] and str(run_dir) == f"runs/{name}"


def test_a_preset_is_any_file_dropped_in_configs(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    for name in ("cpu.toml", "reproduce_cpu.toml"):
        shutil.copy(reproduce.ROOT / "configs" / name, tmp_path / "configs" / name)
    (tmp_path / "configs" / "reproduce_cpu_long.toml").write_text(
        (tmp_path / "configs" / "reproduce_cpu.toml").read_text().replace("eval_factor = 8", "eval_factor = 16"))
    monkeypatch.setattr(reproduce, "ROOT", tmp_path)
    assert list(reproduce.presets()) == ["cpu", "cpu-long"]
    scale, run_dir = scale_and_run_dir(["--scale", "cpu-long"], monkeypatch)
    assert scale.eval_factor == 16 and str(run_dir) == "runs/cpu-long"
    assert "choose cpu, cpu-long (the files configs/reproduce_<name>.toml)" in error_line(reproduce.main,
                                                                                         ["--scale=gpu"])


def test_a_users_file_runs_with_flags_over_it(toy, tmp_path, monkeypatch):
    for argv in ([str(toy)], [f"--config={toy}"], [f"--scale={toy}"]):
        scale, run_dir = scale_and_run_dir(argv, monkeypatch)
        assert scale.base_len == 16 and scale.data_dir == str(tmp_path / "data") and str(run_dir) == "runs/toy"
    scale, run_dir = scale_and_run_dir([str(toy), "--data_dir=data/mine", '--eval={"n_docs": 1}', "--out_dir=x"],
                                       monkeypatch)
    assert scale.data_dir == "data/mine" and str(run_dir) == "x"
    assert scale.eval == {"n_docs": 1, "tasks": ["position", "ppl", "short"]}  # merged key by key
    assert "give a config file or --scale, not both" in error_line(reproduce.main, [str(toy), "--scale=gpu"])


@pytest.mark.parametrize("edit, words", [
    (("base_len = 16", "base_len = 16\nbase_length = 16"), "unknown config key 'base_length' (did you mean "
                                                          "'base_len'?)"),
    (("base_len = 16", 'base_len = "16"'), "bad value '16' for config key 'base_len': expected int"),
    (("base_len = 16\n", ""), "missing key 'base_len': a scale sets at least config, data_dir, base_len"),
    (("base_len = 16", "base_len = 32"), "base_len = 32, but configs/cpu.toml with the train table trains at "
                                         "block_size = 16"),
    (('config = "cpu"', 'config = "cpu30m"'), "no configs/cpu30m.toml; choose a train config, cpu, cpu4k, gpt2_124m"),
    (("extend_steps = 2", "extend_steps = 2\neval_factor = 2"), "the evaluation must reach the fine-tuned length"),
    (("extend_steps = 2", 'extend_steps = 2\ndocuments = "packages"'), "bad value 'packages' for config key "
                                                                       "'documents': choose files or folders"),
    (("extend_steps = 2", "extend_steps = 2\nexplain_docs = 0"), "explain_docs"),
    (("max_iters = 3", "max_iter = 3"), "in the train table: unknown config key 'max_iter' (did you mean "
                                        "'max_iters'?)"),
    (("n_docs = 2", "n_doc = 2"), "in the eval table: unknown config key 'n_doc' (did you mean 'n_docs'?)"),
    (("n_docs = 2", 'n_docs = "two"'), "in the eval table: bad value 'two' for config key 'n_docs'"),
    (("max_iters = 3", "max_iters = 3\npos_encoding = \"alibi\""), "train.pos_encoding is set by reproduce.py"),
    (("n_docs = 2", "n_docs = 2\nmax_len = 64"), "eval.max_len is set by reproduce.py"),
    (("[eval]", "[extend]\nmethod = \"yarn\"\n\n[eval]"), "extend.method is set by reproduce.py"),
])
def test_a_file_the_scripts_cannot_run_is_one_line(toy, edit, words, monkeypatch):
    monkeypatch.setattr(reproduce, "run", lambda *args: None)  # never the experiment, should a file pass
    toy.write_text(toy.read_text().replace(*edit))
    message = error_line(reproduce.main, [str(toy)])
    assert message.startswith(f"error: scale {toy}: ") and words in message, message


def test_an_evaluation_longer_than_the_held_out_documents_is_refused_before_training(toy, tmp_path):
    """Each toy document has ~600 tokens: evaluating to 64 x 16 = 1024 needs documents that val does not hold. The
    corpus is prepared by the run, so the check comes after the data stage and before any training."""
    toy.write_text(toy.read_text().replace("extend_steps = 2", "extend_steps = 2\neval_factor = 64"))
    scale = reproduce.load_scale(toy)
    with pytest.raises(ValueError) as e:
        reproduce.run(scale, tmp_path / "run")
    message = str(e.value)
    assert "\n" not in message and "has 0 held-out (val) documents of >= 1025 tokens" in message
    assert "eval.n_docs = 2" in message and "eval.train_docs = true" in message
    assert set(json.loads((tmp_path / "run" / "stages.json").read_text())) == {"data"}  # nothing trained
    assert not (tmp_path / "run" / "seed1337").exists()
    reproduce.check_corpus(reproduce.load_scale(toy, {"eval_factor": 8}))  # 128 tokens: val serves n_docs = 2
    with pytest.raises(ValueError, match="has 2 held-out"):
        reproduce.check_corpus(reproduce.load_scale(toy, {"eval_factor": 8, "eval": {"n_docs": 3}}))
    reproduce.check_corpus(reproduce.load_scale(toy, {"eval": {"train_docs": True}}))  # asked for: allowed


def test_a_prepared_corpus_is_used_as_it_is(toy, tmp_path):
    """--data_dir=<a prepared corpus> in a new run folder: the data stage reads it, it never prepares the scale's
    source over it (here a source that does not exist, so preparing would fail)."""
    tokens = reproduce.data_stage(reproduce.load_scale(toy))  # prepared once, from the toy's text
    meta = (tmp_path / "data" / "meta.json").read_text()
    elsewhere = reproduce.load_scale(toy, {"source": str(tmp_path / "nowhere")})
    assert reproduce.data_stage(elsewhere) == tokens == json.loads(meta)["tokens"]
    assert (tmp_path / "data" / "meta.json").read_text() == meta


def test_a_scale_prepares_its_corpus_with_its_documents(toy, tmp_path):
    """documents = "folders": the data stage packs a folder's files into documents (data/prepare.py), so the 17
    files of ~600 tokens become documents of several files each."""
    reproduce.data_stage(reproduce.load_scale(toy, {"documents": "folders"}))
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["source"]["documents"] == "folders"
    assert sum(meta["n_docs"].values()) == 1  # 17 x ~600 tokens is one pack of at most 64k tokens
