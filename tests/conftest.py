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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
