"""LongRoPE's factor search (Ding et al. 2024), on a budget: an evolutionary search of the per-pair long factors.

The population starts from the factors that PI, NTK and YaRN amount to (pair i's frequency divided by ext_i), each
with its own attention factor, so that the starting points are exactly those methods at the target length. A
child is a crossover of two of the best candidates, mutated in log space, then put back in the search space: ext_i
in [1, 1.25 * factor] (the paper's bound) and non-decreasing from the highest frequency to the lowest (the
paper's monotonicity constraint). Every candidate is scored by the mean validation loss of the model at the
target length on a few held-out documents; the best is kept, so the result is never worse than any start on
those documents. Short factors stay 1: up to the original length the model is unchanged but for the attention
factor, which transformers applies at every length.

    from posenc.longrope_search import search
    result = search(model, docs, target_len=1024, factor=4.0, original_len=256, budget=48, seed=0)
    result.scaling  # the rope_scaling dict (rope_type longrope) for the checkpoint
"""
import dataclasses
import math
import random
from dataclasses import dataclass

import numpy as np
import torch

from posenc.checkpoint import model_from_checkpoint
from posenc.data import EVAL_DOCS, long_documents, spread
from posenc.positions import RoPE
from posenc.rope_scaling import ROPE_SCALING, rope_frequencies, scaling_dict
from posenc.runtime import resolve_device

STARTS = ("linear", "ntk", "yarn")  # the methods the population starts from
MAX_EXT = 1.25  # ext_i <= MAX_EXT * factor, the paper's search bound


@dataclass
class SearchResult:
    scaling: dict  # the best candidate as a rope_scaling dict
    loss: float  # its mean loss on the search documents at the target length
    starts: dict  # method label -> its loss there (each is also a candidate of the search)
    evaluated: int  # candidates scored


def start_factors(d, theta, factor, original_len):
    """label -> (long factors, attention factor) equal to each start method at lengths past the original."""
    base = rope_frequencies(d, theta)[0]
    out = {}
    for name in STARTS:
        inv_freq, attention_factor = rope_frequencies(d, theta, scaling_dict(name, factor, original_len))
        out[ROPE_SCALING[name].label] = ((base / inv_freq).tolist(), attention_factor)
    return out


def project(ext, factor):
    """Into the search space: each factor in [1, MAX_EXT * factor], non-decreasing from high to low frequency."""
    out, low = [], 1.0
    for x in ext:
        low = min(max(x, low), MAX_EXT * factor)
        out.append(low)
    return out


def child(parents, factor, rng, rate=0.3, sigma=0.1):
    """Per-pair crossover of two parents, then log-normal mutations of some factors and of the attention factor."""
    (a, fa), (b, fb) = rng.sample(parents, 2) if len(parents) > 1 else parents * 2
    ext = [x if rng.random() < 0.5 else y for x, y in zip(a, b)]
    ext = [x * math.exp(rng.gauss(0, sigma)) if rng.random() < rate else x for x in ext]
    attention_factor = (fa if rng.random() < 0.5 else fb) * math.exp(rng.gauss(0, sigma / 4))
    return project(ext, factor), attention_factor


@torch.no_grad()
def mean_loss(model, docs, config):
    """Mean next-token loss of the model's weights under `config`'s positions, over the documents."""
    was, model.transformer.pos = model.transformer.pos, RoPE(config)  # no parameters: positions only
    try:
        return sum(model(d[None, :-1], targets=d[None, 1:])[1].item() for d in docs) / len(docs)
    finally:
        model.transformer.pos = was


def search(model, docs, target_len, factor, original_len, budget=48, population=8, seed=0, log=None):
    """The best LongRoPE long factors for `model` (a RoPE GPT trained at original_len) at target_len, scored on
    `docs` (token tensors of >= target_len + 1 tokens) within `budget` candidates (the starts included)."""
    if budget < len(STARTS):
        raise ValueError(f"the search budget must cover its {len(STARTS)} starting points, got {budget}")
    rng, config = random.Random(seed), model.config
    d, device = model.transformer.pos.rot_dim, next(model.parameters()).device
    docs = [torch.as_tensor(doc[:target_len + 1], device=device) for doc in docs]

    def scaling(ext, attention_factor):
        return scaling_dict("longrope", factor, original_len, short_factor=[1.0] * (d // 2), long_factor=ext,
                            attention_factor=attention_factor)

    def score(ext, attention_factor):
        s = scaling(ext, attention_factor)
        return mean_loss(model, docs, dataclasses.replace(config, block_size=target_len, rope_scaling=s))

    scored, starts = [], {}
    for label, (ext, attention_factor) in start_factors(d, config.rope_theta, factor, original_len).items():
        ext = project(ext, factor)  # already in the space, but for the last bits of float64 ratios
        starts[label] = score(ext, attention_factor)
        scored.append((starts[label], ext, attention_factor))
    while len(scored) < budget:
        scored.sort(key=lambda c: c[0])
        parents = [(ext, af) for _, ext, af in scored[:population]]
        ext, attention_factor = child(parents, factor, rng)
        scored.append((score(ext, attention_factor), ext, attention_factor))
        if log and len(scored) % 8 == 0:
            log(f"  search: {len(scored)}/{budget} candidates, best loss {min(c[0] for c in scored):.4f}")
    loss, ext, attention_factor = min(scored, key=lambda c: c[0])
    return SearchResult(scaling(ext, attention_factor), loss, starts, len(scored))


def search_documents(data_dir, min_len, n_docs):
    """(n_docs val documents of >= min_len tokens, a note on them): spread over those that evaluate.py does not pick
    by default at this length, so that the search does not see the documents its result is reported on; where val
    has no others, evaluate.py's own (and the note says so)."""
    val = long_documents(data_dir, "val", min_len)
    reported = spread(val, min(EVAL_DOCS, len(val)))  # evaluate.py's pick from val (posenc.data.held_out_documents)
    others = [doc for doc in val if not any(len(doc) == len(r) and np.array_equal(doc, r) for r in reported)]
    note = f"val documents of >= {min_len} tokens that evaluate.py does not report on"
    if not others:
        others, note = val, (f"val documents of >= {min_len} tokens, among evaluate.py's {EVAL_DOCS} (val has "
                             "no others): its report on them is not independent of the search")
    if not others:
        raise ValueError(f"no val documents of >= {min_len} tokens in {data_dir} for the factor search: lower the "
                         "target length")
    return spread(others, min(n_docs, len(others))), note


def search_checkpoint(ckpt, data_dir, target_len, factor, original_len, budget, n_docs, seed=0, device="auto",
                      log=print):
    """search() for a checkpoint's weights on its data's held-out documents (extend_context.py --search=true)."""
    model, _ = model_from_checkpoint(ckpt, resolve_device(device))
    docs, note = search_documents(data_dir, target_len + 1, n_docs)
    log(f"searching LongRoPE factors: {budget} candidates, {len(docs)} {note}, at {target_len} tokens")
    result = search(model, docs, target_len, factor, original_len, budget=budget, seed=seed, log=log)
    for label, loss in result.starts.items():
        log(f"  {label:>8}: loss {loss:.4f}")
    log(f"  LongRoPE searched: loss {result.loss:.4f}, long_factor "
        f"{[round(x, 3) for x in result.scaling['long_factor']]}, attention_factor "
        f"{result.scaling['attention_factor']:.4f}")
    return result
