"""The GPU scale rehearsed on a CPU at its true lengths: reproduce.py --scale=gpu trains at 4096, fine-tunes at 16k,
evaluates every task to 32k (every scheme, t5 and rope_nope included, and the training-free scalings) and explains
at 32k,
with the smallest model and one or two steps per stage, so that a crash, a dtype clash or a T x T allocation on
the long path shows on every commit. The command runs in its own process, whose peak memory is the check on
quadratic allocations: one (heads, T, T) fp32 tensor at 32k with 2 heads is 8 GiB.

What a CPU cannot rehearse (CUDA only): FlexAttention's compiled kernels (forward and backward: a CPU runs ALiBi
and T5 through blocks of queries, posenc/attention.py), torch.compile of the training step (the GPU scale's
compile = true is turned off here), bf16 autocast on a GPU (here: the CPU's rule, bf16 where native). Left out
for time: the optional rescues other than Self-Extend (--rescues: the other fine-tunes train as PI and YaRN do;
LongRoPE's search evaluates at the fine-tuned length).
"""

import glob
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from data.prepare import is_val
from posenc.tokenizer import get_tokenizer

ROOT = Path(__file__).resolve().parent.parent
DOC_TOKENS = 34_000  # each document: longer than the evaluation's 32768 + 1 tokens
PEAK_GIB = 3.0  # the command's peak resident memory: below one (2, 32k, 32k) fp32 tensor (8 GiB), with room above
# torch, the data and a 32k forward of the smallest model (the CPU scale's model forwards 32k in 0.46 GiB)


def long_documents(folder, n_train=2):
    """One val and n_train train documents of >= DOC_TOKENS GPT-2 tokens, each the standard library's files
    joined (names chosen so data/prepare.py's hash split puts exactly one in val)."""
    folder.mkdir(parents=True)
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    enc, text, made = get_tokenizer(), "", []
    names = iter(f"doc{i:03d}.txt" for i in range(1000))
    want = {"val": 1, "train": n_train}
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            text += f.read()
        if len(text) > 4 * DOC_TOKENS and len(enc.encode(text, disallowed_special=())) >= DOC_TOKENS:
            split = next(s for s, n in want.items() if n)
            name = next(n for n in names if is_val(n, 0.1) == (split == "val"))
            (folder / name).write_text(text, encoding="utf-8")
            want[split] -= 1
            made.append(name)
            text = ""
            if not any(want.values()):
                return folder
    raise RuntimeError(f"the standard library gave only {made}")


@pytest.mark.slow
def test_the_gpu_scale_runs_on_a_cpu_at_its_true_lengths(tmp_path):
    corpus = long_documents(tmp_path / "text")
    smallest = {"n_layer": 1, "n_head": 2, "n_embd": 32, "batch_size": 1, "max_iters": 2, "warmup_iters": 1,
                "eval_interval": 2, "eval_iters": 1, "log_interval": 1, "ckpt_interval": 2, "compile": False}
    evaluation = {"n_docs": 1, "passkey_trials": 1, "passkey_depths": [0.5], "recall_trials": 1, "stride": 32768,
                  "short_windows": 8}
    run_dir = tmp_path / "run"
    argv = ["--scale=gpu", f"--out_dir={run_dir}", f"--data_dir={tmp_path / 'data'}", f"--source={corpus}",
            "--documents=files",  # its documents are made long already; the scale's folder packing would join them
            "--vocab_size=512", "--schemes=+rope_nope,t5", "--rescues=self_extend", "--workers=1",
            f"--train={json.dumps(smallest)}", "--extend_steps=1",
            '--extend={"compile": false, "eval_interval": 1, "eval_iters": 1}', f"--eval={json.dumps(evaluation)}"]
    code = ("import resource, sys, reproduce; reproduce.main(sys.argv[1:]); "
            "print('peak_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    p = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    peak = int(p.stdout.split("peak_kib")[-1]) / 2 ** 20
    assert peak < PEAK_GIB, f"peak memory {peak:.2f} GiB: something on the long path grows faster than T"

    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert results["max_len"] == 32768 and results["base_len"] == 4096
    models = results["models"]
    for label in ("learned", "sinusoidal", "alibi", "rope", "none", "rope_nope", "t5", "rope + Self-Extend (no fine-tune)"):
        assert label in models
    for label, r in models.items():
        reach = 4096 if label == "learned" else 32768
        assert r["position"]["evaluated_len"] == reach, label
        ran = {e["window"] for e in r["ppl"] if "ppl" in e}
        assert ran == {w for w in (4096, 8192, 16384, 32768) if w <= reach}, label
        keys = {e["length"] for e in r["passkey"]["by_length"] if "accuracy" in e}
        assert keys == {n for n in (4096, 8192, 16384, 32768) if n <= reach}, label
        recalled = [e for e in r["recall"]["by_distance"] if "accuracy" in e]
        assert max(e["length"] for e in recalled) == reach, label
        assert "loss" in r["short"]
    for label in ("rope + PI fine-tuned", "rope + YaRN fine-tuned"):
        assert models[label]["block_size"] == 16384  # fine-tuned at 4 x 4096
    explained = json.loads((run_dir / "seed1337" / "explain" / "rope" / "explain.json").read_text())
    assert explained["max_len"] == 32768 and len(explained["attention"]["loss"]) > 0
    assert "## Why (explain.py)" in (run_dir / "report.md").read_text()
