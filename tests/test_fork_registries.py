"""The promise to a researcher who forks this code: a new position scheme is one class registered in
positions.SCHEMES, a new RoPE scaling one function registered in rope_scaling.ROPE_SCALING, and each then
trains, extends, samples and evaluates through the command lines with no other file touched.

Both are registered at run time here (and unregistered after), so nothing else in the suite sees them.
"""
import json
import os
import sysconfig

import pytest
import torch

import evaluate
import extend_context
import sample
import train
from data.prepare import prepare
from posenc.checkpoint import model_from_checkpoint
from posenc.cli import cli
from posenc.positions import SCHEMES, RoPE
from posenc.rope_scaling import ROPE_SCALING, ScalingMethod

TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--max_iters=4",
        "--warmup_iters=1", "--eval_interval=4", "--eval_iters=1", "--log_interval=2", "--device=cpu"]


class RoPEOnEvenLayers(RoPE):
    """A per-layer scheme: RoPE on layers 0, 2, ...; no positions at all on the others (NoPE layers)."""

    def rotate(self, q, k, pos, layer):
        return super().rotate(q, k, pos, layer) if layer % 2 == 0 else (q, k)


def slow_dims_only(inv_freq, *, factor, **_):
    """A made-up scaling: interpolate only the slower half of the frequencies."""
    half = len(inv_freq) // 2
    return torch.cat((inv_freq[:half], inv_freq[half:] / factor)), 1.0


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    prepare(os.path.join(sysconfig.get_paths()["stdlib"], "email", "*.py"), out, val_fraction=0.2, quiet=True)
    return str(out)


def sample_and_evaluate(ckpt, data_dir, tmp_path, capsys):
    cli(sample.main, [f"--ckpt={ckpt}", "--prompt=def parse(", "--max_new_tokens=40", "--temperature=0"])
    assert "40 tokens in" in capsys.readouterr().err  # past the training length of 32
    results = cli(evaluate.main, [f"--ckpt={ckpt}", f"--data_dir={data_dir}", "--max_len=128", "--n_docs=2",
                                  "--tasks=position,ppl,short", f"--out_dir={tmp_path / 'eval'}", "--base_len=32"])
    (entry,) = results["models"].values()
    assert [e["window"] for e in entry["ppl"]] == [32, 64, 128]
    assert all(torch.isfinite(torch.tensor(e["ppl"])) for e in entry["ppl"])
    return entry


def test_a_scheme_added_at_run_time_trains_samples_and_evaluates(monkeypatch, data_dir, tmp_path, capsys):
    monkeypatch.setitem(SCHEMES, "rope_even", RoPEOnEvenLayers)
    result = train.main(["--pos_encoding=rope_even", f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'run'}", *TINY])
    entry = sample_and_evaluate(result["ckpt"], data_dir, tmp_path, capsys)
    assert entry["pos_encoding"] == "rope_even"
    model, _ = model_from_checkpoint(result["ckpt"])
    assert isinstance(model.transformer.pos, RoPEOnEvenLayers)
    plain = RoPE(model.config)  # the same weights with RoPE on every layer: another model, so the layer was seen
    x = torch.randint(0, 1000, (1, 32))
    with torch.no_grad():
        even = model(x)[0]
        model.transformer.pos = plain
        assert not torch.allclose(model(x)[0], even, atol=1e-4)


def test_a_scaling_added_at_run_time_extends_samples_and_evaluates(monkeypatch, data_dir, tmp_path, capsys):
    monkeypatch.setitem(ROPE_SCALING, "slow_dims", ScalingMethod(slow_dims_only, {}, True, False, "slow dims"))
    base = train.main(["--pos_encoding=rope", f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'base'}", *TINY])
    ckpt = cli(extend_context.main, [f"--ckpt={base['ckpt']}", "--method=slow_dims", "--factor=4", "--steps=2",
                                     f"--out_dir={tmp_path / 'ext'}", "--eval_iters=1", "--device=cpu"])
    saved = json.loads((tmp_path / "ext" / "config.json").read_text())["config"]["model"]
    assert saved["rope_scaling"] == {"rope_type": "slow_dims", "factor": 4.0, "original_max_position_embeddings": 32}
    entry = sample_and_evaluate(ckpt, data_dir, tmp_path, capsys)
    assert entry["rope_scaling"]["rope_type"] == "slow_dims" and entry["training_length"] == 32
