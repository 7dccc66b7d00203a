"""sample.py: the sampling filters, generate's contract, and the command line's one-line errors."""

import dataclasses
import io

import pytest
import torch

import sample
from posenc.checkpoint import FORMAT_VERSION, save_checkpoint
from posenc.cli import cli
from posenc.generation import filter_logits, generate


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.randn(3, 50)
    kept = torch.isfinite(filter_logits(logits, top_k=7))
    assert (kept.sum(-1) == 7).all()
    assert torch.equal(kept, torch.zeros_like(kept).scatter(-1, logits.topk(7).indices, True))
    assert torch.equal(filter_logits(logits, top_k=500), logits)  # k past the vocabulary keeps everything


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p):
    logits = torch.randn(4, 64) * 3
    probs = logits.softmax(-1)
    kept = torch.isfinite(filter_logits(logits, top_p=top_p))
    for row_p, row_kept in zip(probs, kept):
        mass = row_p[row_kept].sum()
        assert mass >= top_p - 1e-6  # enough mass
        assert mass - row_p[row_kept].min() < top_p  # and no token to spare
        assert row_p[~row_kept].max() <= row_p[row_kept].min()  # the most probable ones
    assert torch.equal(filter_logits(logits, top_p=1.0), logits)


def test_top_k_1_and_tiny_top_p_equal_greedy(tiny):
    model = tiny()
    prompt = torch.randint(0, 128, (2, 5))
    greedy = generate(model, prompt, 12, temperature=0.0)
    g = torch.Generator().manual_seed(1)
    assert torch.equal(generate(model, prompt, 12, temperature=1.5, top_k=1, generator=g), greedy)
    assert torch.equal(generate(model, prompt, 12, temperature=1.5, top_p=1e-6, generator=g), greedy)


def test_sampling_is_seeded_and_top_k_restricts_choices(tiny):
    model = tiny()
    prompt = torch.randint(0, 128, (4, 5))

    def run(seed, **kw):
        return generate(model, prompt, 16, temperature=2.0, generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))
    with torch.no_grad():  # every sampled token lies in the top 3 of its step's logits
        out = run(0, top_k=3)
        logits = model(out[:, :-1])[0][:, 4:]  # predictions for positions 5..
    assert (logits.topk(3).indices == out[:, 5:, None]).any(-1).all()


def test_on_token_streams_every_token_and_stop_token_stops(tiny):
    model = tiny()
    prompt = torch.randint(0, 128, (1, 4))
    seen = []
    out = generate(model, prompt, 10, temperature=0.0, on_token=seen.append)
    assert torch.equal(torch.cat(seen, dim=1), out[:, 4:])
    stop = out[0, 7].item()  # the 4th generated token
    first = out[0, 4:].tolist().index(stop)
    stopped = generate(model, prompt, 10, temperature=0.0, stop_token=stop)
    assert stopped.size(1) == 4 + first + 1 and stopped[0, -1].item() == stop


def test_empty_prompt_tensor_is_an_error(tiny):
    with pytest.raises(ValueError, match="empty prompt"):
        generate(tiny(), torch.zeros(1, 0, dtype=torch.long), 3)


# ----------------------------------------------------------------------------- command line

def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli(sample.main, argv)
    return str(exc.value.code), capsys.readouterr()


def test_cli_missing_checkpoint(tmp_path, capsys):
    msg, _ = run_cli([f"--ckpt={tmp_path}/nope.pt", "--prompt=hello"], capsys)
    assert msg.startswith("error: no checkpoint at") and "nope.pt" in msg and "\n" not in msg


def test_cli_empty_prompt(tmp_path, capsys, monkeypatch):
    msg, _ = run_cli([f"--ckpt={tmp_path}/nope.pt", "--prompt="], capsys)
    assert msg.startswith("error: empty prompt")
    (tmp_path / "empty.txt").write_text("")
    msg, _ = run_cli([f"--prompt_file={tmp_path}/empty.txt"], capsys)
    assert msg.startswith("error: empty prompt") and "empty.txt" in msg
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"")))
    msg, _ = run_cli(["--prompt", "-"], capsys)  # `--key value` works too
    assert msg.startswith("error: empty prompt from stdin")


def test_cli_bad_prompt_files(tmp_path, capsys):
    (tmp_path / "blob.bin").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    msg, _ = run_cli([f"--prompt_file={tmp_path}/blob.bin"], capsys)
    assert msg.startswith("error: prompt file") and "binary" in msg
    msg, _ = run_cli([f"--prompt_file={tmp_path}/latin1.txt"], capsys)
    assert "is not UTF-8 text (bad byte at offset 3)" in msg
    msg, _ = run_cli([f"--prompt_file={tmp_path}/missing.txt"], capsys)
    assert msg.startswith("error: cannot read prompt file") and "missing.txt" in msg


@pytest.fixture
def ckpt(tmp_path, tiny):
    """A train.py-format checkpoint of an untrained model with GPT-2's vocabulary."""
    def make(**kw):
        model = tiny(vocab_size=50304, n_layer=1, **kw)
        path = tmp_path / f"{model.config.pos_encoding}.pt"
        config = {"model": dataclasses.asdict(model.config)}
        save_checkpoint({"model": model.state_dict(), "config": config, "format_version": FORMAT_VERSION}, path)
        return path
    return make


def test_cli_streams_text_and_reports_speed(ckpt, tmp_path, capsys, monkeypatch):
    path = ckpt(pos_encoding="rope")
    sample.main([f"--ckpt={path}", "--prompt=Hello", "--max_new_tokens=6", "--num_samples=2", "--device=cpu"])
    out = capsys.readouterr()
    assert "---------------" in out.out
    assert "12 tokens in" in out.err and "tokens/s" in out.err
    (tmp_path / "doc.txt").write_text("A long document. " * 30)  # past block_size=32
    sample.main([f"--ckpt={path}", f"--prompt_file={tmp_path}/doc.txt", "--max_new_tokens=3", "--temperature=0"])
    assert "prompt 121 tokens" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO("naïve café".encode())))
    sample.main([f"--ckpt={path}", "--prompt=-", "--max_new_tokens=2"])
    assert "2 tokens in" in capsys.readouterr().err


def test_cli_learned_prompt_too_long(ckpt, capsys):
    path = ckpt(pos_encoding="learned")
    msg, _ = run_cli([f"--ckpt={path}", "--prompt=word" + " word" * 39, "--max_new_tokens=5"], capsys)
    assert msg.startswith("error: prompt of 40 tokens + 5 new tokens") and "trained with 32 positions" in msg
    msg, _ = run_cli([f"--ckpt={path}", "--prompt=word", "--max_new_tokens=40"], capsys)
    assert "prompt of 1 tokens + 40 new tokens" in msg


@pytest.mark.parametrize("flag, message", [
    ("--top_k=0", "config key 'top_k': expected a number >= 1"),
    ("--top_k=-3", "config key 'top_k': expected a number >= 1"),
    ("--top_p=0", "config key 'top_p': expected a number in (0, 1]"),
    ("--max_new_tokens=-5", "config key 'max_new_tokens': expected a number >= 1"),
    ("--temperature=-1", "config key 'temperature': expected a number >= 0"),
    ("--temperature=nan", "config key 'temperature': expected a finite number"),
    ("--dtype=float8", "config key 'dtype': expected auto, float32, bfloat16 or float16"),
    ("--device=bogus", "config key 'device': expected auto, cpu, cuda, cuda:N or mps"),
    ("--top_kk=3", "unknown config key 'top_kk' (did you mean 'top_k'?)"),
])
def test_cli_bad_values_are_one_line(flag, message, ckpt, capsys):
    msg, _ = run_cli([f"--ckpt={ckpt(pos_encoding='rope')}", "--prompt=hi", flag], capsys)
    assert msg == f"error: {message}" or (msg.startswith("error: ") and message in msg), msg
    assert "\n" not in msg
