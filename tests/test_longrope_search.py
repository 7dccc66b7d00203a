"""LongRoPE's factor search on a toy model: never worse than its starting points (which are exactly PI, NTK and
YaRN at the target length), factors in the paper's monotone search space, seeded and repeatable."""
import dataclasses

import torch
from conftest import tiny_config

from model import GPT
from posenc.longrope_search import MAX_EXT, STARTS, mean_loss, project, search
from posenc.rope_scaling import ROPE_SCALING, scaling_dict

L, FACTOR = 16, 4.0


def toy():
    model = GPT(tiny_config(block_size=L, n_embd=32, n_head=2)).eval()  # 16-dim heads: 8 pairs
    with torch.no_grad():  # sharper attention than the 0.02 init, so positions matter to the loss
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10)
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 128, (4 * L + 1 + k,), generator=g) for k in range(3)]
    return model, docs


def test_search_is_never_worse_than_its_starts_monotone_and_repeatable():
    model, docs = toy()
    result = search(model, docs, 4 * L, FACTOR, L, budget=16, seed=3)
    assert result.evaluated == 16 and set(result.starts) == {ROPE_SCALING[m].label for m in STARTS}
    assert result.loss <= min(result.starts.values())
    ext = result.scaling["long_factor"]
    assert len(ext) == 8 and all(1 <= a <= b <= MAX_EXT * FACTOR for a, b in zip(ext, ext[1:]))
    assert result.scaling["short_factor"] == [1.0] * 8
    config = dataclasses.replace(model.config, block_size=4 * L, rope_scaling=result.scaling)
    assert mean_loss(model, [d[:4 * L + 1] for d in docs], config) == result.loss  # scored at the target length
    again = search(model, docs, 4 * L, FACTOR, L, budget=16, seed=3)
    assert again.scaling == result.scaling and again.loss == result.loss
    assert isinstance(model.transformer.pos, type(GPT(model.config).transformer.pos))  # restored
    assert model.transformer.pos.scaling is None


def test_starting_points_are_exactly_pi_ntk_and_yarn_at_the_target_length():
    model, docs = toy()
    result = search(model, docs, 4 * L, FACTOR, L, budget=3)
    for name in STARTS:
        config = dataclasses.replace(model.config, block_size=4 * L, rope_scaling=scaling_dict(name, FACTOR, L))
        loss = mean_loss(model, [d[:4 * L + 1] for d in docs], config)
        assert abs(result.starts[ROPE_SCALING[name].label] - loss) < 1e-5, name  # fp32: summation order only


def test_projection_keeps_factors_in_the_search_space():
    assert project([0.5, 3.0, 2.0, 9.0, 4.0], 4.0) == [1.0, 3.0, 3.0, 5.0, 5.0]
