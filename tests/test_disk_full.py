"""A full disk, for every writer besides train.py (tests/test_train.py has its own): the command exits 1 with one line
that says the disk is full, about how much it needed and how much is free; nothing half-written stays behind, and a
file that was there before is kept. The disk is simulated: the write raises OSError(ENOSPC) and shutil.disk_usage
reports 2 kB free (a real full tmpfs gives the same lines)."""
import errno
import os
import re
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

import evaluate
import explain
import extend_context
import train
from data.prepare import prepare
from posenc import run_folder
from posenc.cli import cli
from posenc.run_folder import WriteError, write_atomic

FREE = 2000  # bytes free on the simulated disk
FULL = r"no space left on the device of .+: it needs about \d+(\.\d)? (bytes|kB|MB) and 2\.0 kB is free"


@pytest.fixture
def full_disk(monkeypatch):
    """full_disk(target, name): target.name raises ENOSPC from now on, after writing a few bytes if given a file."""
    monkeypatch.setattr(run_folder.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - FREE,
                                                                                              FREE))

    def fill(target, name):
        def no_space(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(target, name, no_space)
    return fill


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished tiny rope run on GPT-2 tokens (the exports need the full vocabulary), and its data."""
    root = tmp_path_factory.mktemp("full")
    prepare(os.path.join(sysconfig.get_paths()["stdlib"], "email", "*.py"), root / "data", val_fraction=0.2, quiet=True)
    train.main([f"--data_dir={root / 'data'}", f"--out_dir={root / 'run'}", "--n_layer=1", "--n_head=2", "--n_embd=32",
                "--block_size=32", "--batch_size=2", "--max_iters=2", "--eval_iters=1", "--device=cpu"])
    return root


def error_of(main, argv):
    """The one line a command exits with (cli, as its __main__ runs it: SystemExit with a message is exit 1)."""
    with pytest.raises(SystemExit) as e:
        cli(main, argv, errors=(ValueError, OSError, train.TrainingError))
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg


def test_write_atomic_keeps_the_old_file_and_says_how_much_space(tmp_path, full_disk):
    path = tmp_path / "results.json"
    path.write_text("old")
    full_disk(Path, "write_text")
    with pytest.raises(WriteError) as e:
        write_atomic(path, "x" * 3000)
    assert re.fullmatch(f"could not write {path}: no space left on the device of {tmp_path}: it needs about 3.0 kB "
                        "and 2.0 kB is free", str(e.value)), str(e.value)
    assert os.listdir(tmp_path) == ["results.json"] and path.read_text() == "old"


@pytest.mark.parametrize("stage", ["evaluate", "explain"])
def test_evaluate_and_explain_exit_1_when_their_results_cannot_be_written(stage, run, tmp_path, full_disk):
    full_disk(Path, "write_text")  # results.json / explain.json: the first file each writes
    main, name = {"evaluate": (evaluate.main, "results.json"), "explain": (explain.main, "explain.json")}[stage]
    argv = [f"--ckpt={run / 'run' / 'ckpt.pt'}", f"--data_dir={run / 'data'}", f"--out_dir={tmp_path / 'out'}",
            "--max_len=64", "--n_docs=1"] + (["--tasks=short"] if stage == "evaluate" else [])
    msg = error_of(main, argv)
    assert re.match(f"error: could not write {tmp_path / 'out' / name}: {FULL}$", msg), msg
    assert not (tmp_path / "out" / name).exists() and not list((tmp_path / "out").glob("*.tmp*"))


def test_a_training_free_extension_exits_1_and_writes_nothing(run, tmp_path, full_disk):
    full_disk(torch, "save")
    out = tmp_path / "ext"
    msg = error_of(extend_context.main, [f"--ckpt={run / 'run' / 'ckpt.pt'}", "--method=linear", "--factor=2",
                                         "--steps=0", f"--out_dir={out}"])
    assert re.match(f"error: could not save checkpoint {out / 'ckpt.pt'}: {FULL} \\(nothing was written\\)$", msg), msg
    assert sorted(os.listdir(out)) == []


def test_exports_exit_1_and_leave_no_half_export(run, tmp_path, full_disk, monkeypatch):
    gguf = pytest.importorskip("gguf")
    transformers = pytest.importorskip("transformers")
    from scripts import export_gguf, export_hf
    ckpt = run / "run" / "ckpt.pt"
    full_disk(gguf.GGUFWriter, "write_tensors_to_file")
    msg = error_of(export_gguf.main, [f"--ckpt={ckpt}", f"--out={tmp_path / 'm.gguf'}"])
    assert re.match(f"error: could not write {tmp_path / 'm.gguf'}: {FULL}$", msg), msg
    assert os.listdir(tmp_path) == []  # no m.gguf.tmp

    def half_then_full(self, folder, *args, **kwargs):  # config.json lands, then the weights do not
        (Path(folder) / "config.json").write_text("{}")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", half_then_full)
    msg = error_of(export_hf.main, [f"--ckpt={ckpt}", f"--out_dir={tmp_path / 'hf'}"])
    assert re.match(f"error: could not export to {tmp_path / 'hf'}: {FULL} \\(nothing was kept\\)$", msg), msg
    assert os.listdir(tmp_path / "hf") == []  # no config.json that would pass for an export
