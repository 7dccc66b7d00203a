"""Tests import the top-level modules (model, positions, train, ...) from the repository root.

`tiny` is the one small model every test file builds: tiny(**overrides) -> GPT in eval mode.
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(min(2, torch.get_num_threads()))

from model import GPT, GPTConfig  # noqa: E402  (after the path is set)

TINY = dict(block_size=32, vocab_size=128, n_layer=2, n_head=4, n_embd=32)


def tiny_config(**overrides) -> GPTConfig:
    """A 2-layer, width-32 config trained at 32 tokens over a 128-token vocabulary, with overrides."""
    return GPTConfig(**(TINY | overrides))


@pytest.fixture
def tiny():
    """tiny(**overrides) -> a freshly initialized tiny GPT (see tiny_config) in eval mode."""
    return lambda **overrides: GPT(tiny_config(**overrides)).eval()


@pytest.fixture
def threads_of_a_worker_slot():
    """Run this test's in-process work with the thread count that jobs.py gives each of two parallel
    subprocesses (half the cores), so that in-process and parallel runs reduce their sums in the same order
    and give bit-identical numbers. A different thread count changes float32 rounding (last bits), which can
    flip a near-zero difference's sign or a greedy passkey token, so no tolerance can state that comparison."""
    import jobs
    before = torch.get_num_threads()
    torch.set_num_threads(int(jobs._slots(2)[0]["OMP_NUM_THREADS"]))
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
