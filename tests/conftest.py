"""Tests import the stages (model, train, ...) and the package (posenc) from the repository root, put on the
path by pytest.ini's `pythonpath`, as a user's code run from the root would.

`tiny` is the one small model every test file builds: tiny(**overrides) -> GPT in eval mode.
"""

import glob
import os
import sysconfig

import pytest
import torch

from model import GPT, GPTConfig

torch.set_num_threads(min(2, torch.get_num_threads()))

TINY = dict(block_size=32, vocab_size=128, n_layer=2, n_head=4, n_embd=32)


def tiny_config(**overrides) -> GPTConfig:
    """A 2-layer, width-32 config trained at 32 tokens over a 128-token vocabulary, with overrides."""
    return GPTConfig(**(TINY | overrides))


EXPORT_LEN = 16  # the original training length of the export tests' models (test_hf.py, test_gguf.py)


def random_export_model(scaling=None, **kw):
    """A GPT-2-vocabulary model with far-from-init weights (so a wrong mapping shows in the logits), its block size
    as extend_context.py sets it: the target length when scaled, else the training length."""
    block = int(EXPORT_LEN * scaling["factor"]) if scaling else EXPORT_LEN
    config = GPTConfig(**{"block_size": block, "vocab_size": 50304, "n_layer": 2, "n_head": 4, "n_embd": 32,
                          "rope_scaling": scaling, "pos_encoding": "rope", **kw})
    model = GPT(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # LayerNorm weights ~ N(1, 0.5), biases ~ N(0, 0.5)
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
            else:
                p.mul_(5)
    return model


def randomized(model):
    """Sharper attention than the 0.02 init, and a T5 table that is not zero: what a position does then shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3 if name.endswith("pos.table") else 0.2)
    return model


def sharpened(model):
    """The model with attention sharp enough that positions show: at init (std 0.02) attention is near uniform and
    an off-by-one position moves the logits by about float rounding. Matmul weights x5; a table that starts at zero
    (T5's bias, which x5 would leave at zero: a model with no positions) is drawn N(0, 1). Returns the model."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and not p.any():
                p.normal_(0, 1)
            elif p.dim() >= 2:
                p.mul_(5)
    return model


def stdlib_corpus(root, packages):
    """A corpus of the standard library's modules in `packages`, one document per file, prepared into root/data
    (80/20 train/val); root/text holds the documents."""
    from data.prepare import prepare
    stdlib = sysconfig.get_paths()["stdlib"]
    files = sorted(f for pkg in packages for f in glob.glob(os.path.join(stdlib, pkg, "*.py")))
    (root / "text").mkdir()
    for i, path in enumerate(files):
        with open(path, encoding="utf-8") as f:
            (root / "text" / f"doc{i:03d}.txt").write_text(f.read(), encoding="utf-8")
    prepare(str(root / "text"), root / "data", val_fraction=0.2, quiet=True)
    return root


@pytest.fixture
def tiny():
    """tiny(**overrides) -> a freshly initialized tiny GPT (see tiny_config) in eval mode."""
    return lambda **overrides: GPT(tiny_config(**overrides)).eval()


@pytest.fixture
def threads_of_a_worker_slot():
    """Run this test's in-process work with the thread count that posenc/jobs.py gives each of two parallel
    subprocesses (half the cores), so that in-process and parallel runs reduce their sums in the same order
    and give bit-identical numbers. A different thread count changes float32 rounding (last bits), which can
    flip a near-zero difference's sign or a greedy passkey token, so no tolerance can state that comparison."""
    from posenc import jobs
    before = torch.get_num_threads()
    torch.set_num_threads(int(jobs._slots(2)[0]["OMP_NUM_THREADS"]))
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def error_line(main, argv):
    """The message a CLI (config.cli) exits with for bad input, checked to be one line starting with 'error: '."""
    from posenc.cli import cli
    with pytest.raises(SystemExit) as e:
        cli(main, argv, errors=(ValueError, OSError, ImportError))
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg
