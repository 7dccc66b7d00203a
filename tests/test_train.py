"""train.py on CPU with tiny models: every scheme trains, resume is exact, checkpoints are safe, errors are clear."""
import hashlib
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

import model as model_module
import train
from data.prepare import prepare
from posenc.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from posenc.cli import Interrupted
from posenc.data import BatchSampler
from posenc.positions import SCHEMES
from posenc.run_folder import RunFolderError
from train import load_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A small real corpus: the standard library's email package (20 files, ~155k tokens), 3 files in val."""
    out = tmp_path_factory.mktemp("data")
    prepare(os.path.join(sysconfig.get_paths()["stdlib"], "email", "*.py"), out, val_fraction=0.2, quiet=True)
    return str(out)


def tiny(data_dir, out_dir, **overrides):
    """A TrainConfig for a 2-layer, width-32, T=32 model, built through the same parser as the command line."""
    flags = dict(data_dir=data_dir, out_dir=out_dir, device="cpu", n_layer=2, n_head=2, n_embd=32, block_size=32,
                 batch_size=4, max_iters=6, warmup_iters=2, learning_rate=3e-3, eval_interval=3, eval_iters=2,
                 log_interval=1, ckpt_interval=3)
    flags.update(overrides)
    return load_config([f"--{k}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in flags.items()])


def metrics(out_dir, kind="train"):
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if r["kind"] == kind]
    assert len(steps) == len(set(steps)), f"duplicate {kind} steps in metrics.jsonl: {steps}"
    return {r["step"]: r["loss"] for r in rows if r["kind"] == kind}


RESUME = dict(max_iters=8, lr_decay_iters=8, eval_interval=4, ckpt_interval=4, dropout=0.1)  # dropout: RNG matters


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory):
    """8 uninterrupted steps, the reference for the resume tests."""
    out = tmp_path_factory.mktemp("straight")
    result = train.main(tiny(data_dir, out, **RESUME))
    return result, metrics(out), metrics(out, "val")


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    cfg = load_config(["--learning_rate=1.0", "--min_lr=0.1", "--warmup_iters=10", "--max_iters=110"])
    lrs = [train.get_lr(step, cfg) for step in range(130)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11])) and lrs[10] == 1.0
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[60] == pytest.approx(0.55) and lrs[110:] == [0.1] * 20


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_every_scheme_trains_and_its_checkpoint_reloads(scheme, data_dir, tmp_path):
    result = train.main(tiny(data_dir, tmp_path, pos_encoding=scheme))
    losses = metrics(tmp_path)
    assert sorted(losses) == list(range(1, 7)) and all(map(torch.isfinite, torch.tensor(list(losses.values()))))
    assert result["step"] == 6 and result["ckpt"] == str(tmp_path / "ckpt.pt")
    model, ckpt = model_from_checkpoint(result["ckpt"])
    assert model.config.pos_encoding == scheme and ckpt["step"] == 6 and not model.training
    # the saved weights are the trained ones: they give the final validation loss again, on the same batches
    sampler = BatchSampler(data_dir, "val", 4, 32, ckpt["config"]["seed"] + 1)
    bf16 = ckpt["config"]["dtype"] == "bfloat16"  # dtype=auto: bf16 autocast on a CPU that has it
    autocast = torch.autocast("cpu", torch.bfloat16) if bf16 else nullcontext()
    loss = train.estimate_loss(model, sampler, sampler.state_dict(), 2, autocast, "cpu")
    torch.testing.assert_close(loss.item(), result["val_loss"], rtol=0, atol=1e-6)  # same weights, same math
    run = json.loads((tmp_path / "config.json").read_text())
    assert run["config"]["model"]["pos_encoding"] == scheme and run["torch"] == torch.__version__
    assert run["data"]["sha256"] and run["seed"] == 1337 and run["config"]["device"] == "cpu"


def test_loss_decreases(data_dir, tmp_path):
    train.main(tiny(data_dir, tmp_path, max_iters=20, learning_rate=1e-2, eval_interval=20, ckpt_interval=0))
    losses, val = metrics(tmp_path), metrics(tmp_path, "val")
    last = sum(losses[s] for s in range(16, 21)) / 5
    assert last < losses[1] - 1.0, losses
    assert val[20] < val[0] - 1.0, val


def test_resume_is_exact_and_refuses_another_architecture(data_dir, tmp_path, straight, capsys):
    _, losses, val = straight
    first = train.main(tiny(data_dir, tmp_path, **{**RESUME, "max_iters": 4}))
    assert first["step"] == 4
    before = sha256s(tmp_path)
    with pytest.raises(ValueError, match=r"cannot resume .* with another architecture: n_layer=1 \(the checkpoint has "
                                         r"2\); .* --init_from="):
        train.main(tiny(data_dir, tmp_path, **RESUME, resume=True, n_layer=1))
    assert sha256s(tmp_path) == before  # refused before anything was written
    second = train.main(tiny(data_dir, tmp_path, **RESUME, resume=True, grad_clip=1.0))  # the same run
    assert second["step"] == 8
    resumed = metrics(tmp_path)
    assert sorted(resumed) == sorted(losses) == list(range(1, 9))
    torch.testing.assert_close(resumed, losses, rtol=0, atol=1e-6)
    torch.testing.assert_close(metrics(tmp_path, "val"), val, rtol=0, atol=1e-6)


def test_resume_on_the_command_line_defaults_to_the_runs_settings(data_dir, tmp_path, capsys):
    train.main(tiny(data_dir, tmp_path, max_iters=2, eval_interval=0))
    cfg = load_config([f"--out_dir={tmp_path}", "--resume=true", "--max_iters=3", "--learning_rate=1e-3"])
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.batch_size, cfg.max_iters) == (2, 32, 4, 3)
    assert train.main(cfg)["step"] == 3
    out = capsys.readouterr().out
    assert "resuming" in out and "max_iters 2 -> 3" in out and "learning_rate 0.003 -> 0.001" in out


def test_resume_refuses_other_data(data_dir, tmp_path, tmp_path_factory):
    train.main(tiny(data_dir, tmp_path, max_iters=2, eval_interval=0))
    other = tmp_path_factory.mktemp("other")
    prepare(os.path.join(sysconfig.get_paths()["stdlib"], "json", "*.py"), other, val_fraction=0.3, quiet=True)
    with pytest.raises(ValueError, match=f"cannot resume .* on other data: {other} holds other tokens"):
        train.main(tiny(str(other), tmp_path, max_iters=4, resume=True))


@pytest.mark.parametrize("at_step", [3, 4])  # 4 is an evaluation step: its validation must not be lost
def test_interrupt_saves_a_checkpoint_that_resumes_exactly(at_step, data_dir, tmp_path, straight, monkeypatch):
    _, losses, val = straight
    original, calls = BatchSampler.next, []

    def next_then_interrupt(self):
        if self.split == "train":
            calls.append(1)
            if len(calls) == at_step:  # in the middle of that step, a signal twice at once (as `timeout` does)
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGTERM)
        return original(self)

    monkeypatch.setattr(BatchSampler, "next", next_then_interrupt)
    with pytest.raises(Interrupted, match=f"checkpoint at step {at_step} in .*--resume=true") as e:
        train.main(tiny(data_dir, tmp_path, **RESUME))
    assert e.value.signum == signal.SIGTERM
    assert load_checkpoint(tmp_path / "ckpt.pt")["step"] == at_step
    monkeypatch.setattr(BatchSampler, "next", original)
    assert train.main(tiny(data_dir, tmp_path, **RESUME, resume=True))["step"] == 8
    torch.testing.assert_close(metrics(tmp_path), losses, rtol=0, atol=1e-6)
    torch.testing.assert_close(metrics(tmp_path, "val"), val, rtol=0, atol=1e-6)


def sha256s(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir()) if p.is_file()}


def test_a_run_folder_is_never_silently_reused(data_dir, tmp_path):
    train.main(tiny(data_dir, tmp_path, max_iters=2, eval_interval=0))
    before = sha256s(tmp_path)
    with pytest.raises(RunFolderError, match="holds an earlier run .*--resume=true.*--overwrite=true"):
        train.main(tiny(data_dir, tmp_path, max_iters=3))
    with pytest.raises(ValueError, match="config key 'max_iters'"):
        train.main(tiny(data_dir, tmp_path, max_iters=-5))
    assert sha256s(tmp_path) == before
    (tmp_path / "run.lock").write_text(f"{os.getppid()} {socket.gethostname()}\n")  # a live process owns it
    with pytest.raises(RunFolderError, match=f"is in use by process {os.getppid()}"):
        train.main(tiny(data_dir, tmp_path, max_iters=3, resume=True))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "run.lock").write_text(f"{dead.pid} {socket.gethostname()}\n")  # its owner is gone: stale
    (tmp_path / f"ckpt.pt.tmp{dead.pid}").write_bytes(b"half a checkpoint")
    assert train.main(tiny(data_dir, tmp_path, max_iters=3, resume=True))["step"] == 3
    assert sorted(sha256s(tmp_path)) == ["ckpt.pt", "config.json", "metrics.jsonl"]  # no lock, no stale temp file
    assert train.main(tiny(data_dir, tmp_path, max_iters=1, overwrite=True))["step"] == 1  # asked for explicitly
    assert load_checkpoint(tmp_path / "ckpt.pt")["step"] == 1


def test_a_diverging_run_keeps_the_good_checkpoint(data_dir, tmp_path):
    train.main(tiny(data_dir, tmp_path, max_iters=4, eval_interval=0))
    good = sha256s(tmp_path)["ckpt.pt"]
    with pytest.raises(train.TrainingError, match=r"(loss .*x the mean of the last|non-finite).*the last checkpoint "
                                                  r".* is kept"):
        train.main(tiny(data_dir, tmp_path, max_iters=40, learning_rate=1e6, warmup_iters=0, ckpt_interval=1,
                        grad_clip=0.0, resume=True))
    ckpt = load_checkpoint(tmp_path / "ckpt.pt")
    assert sha256s(tmp_path)["ckpt.pt"] == good and ckpt["step"] == 4


def test_a_failed_save_keeps_the_previous_checkpoint(data_dir, tmp_path, monkeypatch, capsys):
    real_save, calls = torch.save, []

    def failing_save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second checkpoint: half-written, then the disk is full
            f.write(b"partial")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    result = train.main(tiny(data_dir, tmp_path, max_iters=4, ckpt_interval=2, eval_interval=0))
    err = capsys.readouterr().err
    assert "error: could not save checkpoint" in err and "No space left on device" in err
    assert result["step"] == 4 and result["ckpt"] == str(tmp_path / "ckpt.pt")
    assert load_checkpoint(tmp_path / "ckpt.pt")["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "config.json", "metrics.jsonl"]  # no tmp file


def test_bad_checkpoints_give_one_clear_line(tmp_path, straight):
    path = Path(straight[0]["ckpt"])
    cases = {"truncated.pt": path.read_bytes()[: path.stat().st_size // 2], "garbage.pt": os.urandom(4096)}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match=f"checkpoint {tmp_path / name} is corrupt or truncated: "):
            load_checkpoint(tmp_path / name)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="is not a train.py checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    torch.save({"model": {}, "config": {}, "format_version": 1, "path": Path("x")}, tmp_path / "unsafe.pt")
    with pytest.raises(CheckpointError, match=r"holds pickled code or objects that a safe load refuses \(pathlib"):
        load_checkpoint(tmp_path / "unsafe.pt")
    torch.save({"model": {}, "config": {}, "format_version": 1, "run": Malicious()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"refuses \(posix.system\).*could run that code"):
        load_checkpoint(tmp_path / "evil.pt")
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(Malicious(), protocol=4))
    with pytest.raises(CheckpointError, match="is a plain pickle, not a file train.py writes"):
        load_checkpoint(tmp_path / "evil.pkl")
    with pytest.raises(CheckpointError) as e:
        train.main(load_config([f"--out_dir={tmp_path / 'new'}", "--resume=true"]))  # no run there
    assert "nothing to resume" in str(e.value) and "\n" not in str(e.value)


class Malicious:
    """A pickle that would run a shell command when loaded unsafely."""

    def __reduce__(self):
        return os.system, ("echo this must never run",)


def test_state_dict_mismatch_is_one_line(data_dir, tmp_path, straight):
    ckpt = load_checkpoint(straight[0]["ckpt"])  # a rope model: no position table
    ckpt["config"]["model"]["pos_encoding"] = "learned"  # ... whose config claims learned positions
    save_checkpoint(ckpt, tmp_path / "mixed.pt")
    with pytest.raises(CheckpointError, match=r"does not fit a learned model .*missing: transformer\.pos\.wpe"):
        model_from_checkpoint(tmp_path / "mixed.pt")
    learned = train.main(tiny(data_dir, tmp_path / "learned", pos_encoding="learned", max_iters=1))
    with pytest.raises(CheckpointError, match=r"does not fit a learned model .*shape: transformer\.pos\.wpe\.weight"):
        train.main(tiny(data_dir, tmp_path / "longer", init_from=learned["ckpt"], block_size=64))


def test_init_from_loads_weights_and_applies_this_runs_length_and_scaling(data_dir, tmp_path, straight):
    result, _, val = straight
    same = train.main(tiny(data_dir, tmp_path / "same", init_from=result["ckpt"], max_iters=1, n_layer=1))
    assert metrics(tmp_path / "same", "val")[0] == pytest.approx(val[8], abs=1e-6)  # step 0 = the source's weights
    assert same["step"] == 1
    scaling = {"rope_type": "linear", "factor": 2.0}
    train.main(tiny(data_dir, tmp_path / "long", init_from=result["ckpt"], max_iters=1, block_size=64,
                    rope_scaling=scaling))
    saved = json.loads((tmp_path / "long" / "config.json").read_text())["config"]["model"]
    assert (saved["block_size"], saved["rope_scaling"], saved["n_layer"]) == (64, scaling, 2)


def test_non_finite_loss_stops_before_the_optimizer_step(data_dir, tmp_path, monkeypatch):
    forward, calls = model_module.GPT.forward, []

    def nan_from_step_4(self, idx, targets=None, **kwargs):
        logits, loss = forward(self, idx, targets, **kwargs)
        calls.append(self.training)
        return logits, (loss * float("nan") if self.training and sum(calls) >= 4 else loss)

    monkeypatch.setattr(model_module.GPT, "forward", nan_from_step_4)
    with pytest.raises(train.TrainingError, match=r"non-finite loss \(nan\) at step 4: stopped before the optimizer"):
        train.main(tiny(data_dir, tmp_path, ckpt_interval=2))
    ckpt = load_checkpoint(tmp_path / "ckpt.pt")
    assert ckpt["step"] == 2 and all(torch.isfinite(t).all() for t in ckpt["model"].values())


def test_wandb_off_writes_nothing(data_dir, tmp_path):
    train.main(tiny(data_dir, tmp_path, max_iters=1))
    assert not (tmp_path / "wandb").exists()


def test_wandb_online_without_a_key_falls_back_to_offline(data_dir, tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    t0 = time.time()
    train.main(tiny(data_dir, tmp_path / "run", max_iters=2, wandb="online"))
    assert "no API key" in capsys.readouterr().err and time.time() - t0 < 120
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*")), "no offline run under out_dir/wandb"


@pytest.mark.parametrize("args, message", [
    (["--n_layr=2"], "error: unknown config key 'n_layr' (did you mean 'n_layer'?)"),
    (["--data_dir=/nonexistent/data", "--max_iters=1"], "error: no prepared data at /nonexistent/data: run "),
])
def test_command_line_errors_are_one_line(args, message, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), f"--out_dir={tmp_path}", *args],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 1 and proc.stderr.startswith(message) and proc.stderr.count("\n") == 1, proc.stderr
