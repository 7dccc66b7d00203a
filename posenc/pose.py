"""PoSE position ids (Zhu et al. 2023, "PoSE: Efficient Context Window Extension of LLMs via Positional
Skip-wise Training"): train at the base window while the position ids reach the target length.

A window of `window` tokens is cut into `chunks` pieces at random points; chunk i keeps its tokens in order and
its position ids are shifted by a skip u_i, with u_0 = 0 <= u_1 <= ... drawn uniformly from [0, target_len -
window]. So the ids increase along the window, the largest stays below target_len, and every relative distance
up to target_len - 1 occurs with nonzero probability, while a step costs what a base-length step costs. The
tokens and the loss are the ordinary ones: only the positions the model is told change. The authors' runs use
it together with a scaling (Position Interpolation by default; also YaRN and NTK): extend_context.py --pose.
"""

import hashlib

import torch


def pose_positions(batch_size, window, target_len, chunks, generator):
    """(batch_size, window) int64 position ids, one independent draw per sequence."""
    if not 1 <= chunks <= window:
        raise ValueError(f"PoSE needs 1 <= chunks <= window ({window} tokens), got chunks={chunks}")
    if target_len < window:
        raise ValueError(f"PoSE's target length {target_len} is shorter than its window {window}")
    rows = []
    for _ in range(batch_size):
        cuts = torch.randperm(window - 1, generator=generator)[:chunks - 1] + 1  # distinct cut points in 1..window-1
        starts = torch.cat((torch.zeros(1, dtype=torch.long), cuts.sort().values))
        skips = torch.randint(target_len - window + 1, (chunks - 1,), generator=generator).sort().values
        skips = torch.cat((torch.zeros(1, dtype=torch.long), skips))  # u_0 = 0 <= u_1 <= ...
        chunk = torch.searchsorted(starts, torch.arange(window), right=True) - 1  # the chunk of each token
        rows.append(torch.arange(window) + skips[chunk])
    return torch.stack(rows)


class PoSEPositions:
    """The position ids of each training batch: drawn from (seed, batch index), so a resumed run draws the
    same ones again (the sampler's state is its batch count)."""

    def __init__(self, window, target_len, chunks, seed, rank=0):
        pose_positions(1, window, target_len, chunks, torch.Generator())  # a bad setting fails here, in one line
        self.window, self.target_len, self.chunks, self.seed, self.rank = window, target_len, chunks, seed, rank
        self.generator = torch.Generator()

    def draw(self, batch_size, batch_index, device):
        digest = hashlib.sha256(f"pose,{self.seed},{self.rank},{batch_index}".encode()).digest()
        self.generator.manual_seed(int.from_bytes(digest[:8], "little"))
        pos = pose_positions(batch_size, self.window, self.target_len, self.chunks, self.generator)
        return pos.to(device)
