r"""Why a model fails past its training length, and why a rescue works: figures and explain.md for one checkpoint.

    python explain.py --ckpt=out/cpu_rope/ckpt.pt                       # to 8x its training length
    python explain.py --ckpt=runs/cpu/seed1337/rope_linear_ft/ckpt.pt --max_len=2048
    python explain.py --ckpt=out/cpu_rope/ckpt.pt --rope_scaling='{"rope_type": "yarn", "factor": 4}'

Three sections, each opened by sentences that read its figure for this model from the measured numbers:
1. angles: for each rotary pair (or sinusoidal channel pair), the largest angle reached inside the length
   the weights were trained at, against the angle at max_len; a pair whose wavelength exceeds that length
   never completed a turn there, so past it shows angles it never saw (the "critical dimension" of YaRN and of
   Liu et al. 2023). The same after each scaling in the registry (rope_scaling.ROPE_SCALING).
2. decay: RoFormer's long-term-decay bound of q·k over relative distance (Su et al. 2021, §3.4.3), for the
   model's frequencies and each scaling's; ALiBi's bias line per head beside it.
3. attention: on held-out long documents, from the probabilities of the model's own forward
   (model.record_attention): attention mass by distance for queries before and past L, the share of
   attention on keys at distances never seen in training (>= L), entropy by query position, and the loss by
   position of the same documents.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model import record_attention
from posenc.checkpoint import CheckpointError, model_from_checkpoint
from posenc.cli import cli
from posenc.config import ConfigError, at_least, check_fields, parse
from posenc.data import check_vocabulary, data_identity, held_out_documents
from posenc.eval_tasks import training_length
from posenc.explain_report import write_explanation
from posenc.positions import RoPE, Sinusoidal
from posenc.rope_scaling import ROPE_SCALING, check_scaling, rope_frequencies, scaling_dict
from posenc.run_folder import claim, clear, write_atomic
from posenc.runtime import resolve_device


@dataclass
class ExplainConfig:
    ckpt: str = ""  # the checkpoint to explain (train.py, extend_context.py or scripts/import_hf.py)
    max_len: int = 0  # explain up to this length; 0: 8 x the training length
    rope_scaling: dict | None = None  # use this scaling instead of the checkpoint's (training-free), {}: none
    data_dir: str = ""  # documents for section 3; "": the checkpoint's data
    n_docs: int = 4  # held-out documents of max_len + 1 tokens for section 3
    train_docs: bool = False  # as evaluate.py's: top up from train when val has too few (not held out)
    out_dir: str = ""  # "": <checkpoint's folder>/explain
    overwrite: bool = False  # replace an earlier explanation in out_dir
    device: str = "auto"

    def __post_init__(self):
        check_fields(self)
        at_least(self, 0, "max_len")
        at_least(self, 1, "n_docs")
        if self.rope_scaling:
            check_scaling(self.rope_scaling)


# ----------------------------------------------------------------------------- 1. angles

def angle_coverage(inv_freq, trained_len, max_len, trained_freq=None):
    """Per pair i: the angle reached over the trained length, trained_len·ω_i with the frequencies the weights
    were trained with (trained_freq, default inv_freq), and over max_len with inv_freq; the wavelength 2π/ω_i;
    and whether the pair leaves its trained range: it never completed a turn within the trained length (its
    wavelength is longer, so not every angle was seen) and max_len reaches past the angle it saw. PI by s at
    s·trained_len reaches exactly the trained angle: in range."""
    inv_freq = torch.as_tensor(inv_freq, dtype=torch.float64)
    trained_freq = inv_freq if trained_freq is None else torch.as_tensor(trained_freq, dtype=torch.float64)
    seen = trained_len * trained_freq
    reached = max_len * inv_freq
    full_turn = seen >= 2 * math.pi
    leaves = ~full_turn & (reached > seen * (1 + 1e-9))
    return {"seen": seen.tolist(), "reached": reached.tolist(), "wavelength": (2 * math.pi / trained_freq).tolist(),
            "leaves": leaves.tolist(), "no_full_turn": int((~full_turn).sum())}


def frequencies_of(model, scaling="own", seq_len=None):
    """(inv_freq, attention_factor, kind) of the model's position scheme, with its own scaling or another."""
    scheme, c = model.transformer.pos, model.config
    if isinstance(scheme, RoPE):
        s = c.rope_scaling if scaling == "own" else scaling
        return (*rope_frequencies(scheme.rot_dim, c.rope_theta, s, seq_len), "rope")
    if isinstance(scheme, Sinusoidal):
        factor = scheme.factor if scaling == "own" else float((scaling or {}).get("factor", 1.0))
        return 10000 ** (-torch.arange(0, c.n_embd, 2, dtype=torch.float64) / c.n_embd) / factor, 1.0, "sinusoidal"
    return None, 1.0, type(scheme).__name__


def scalings_for(model, trained_len, max_len):
    """label -> rope_scaling of every registered method applied to the model's training length (the training-
    free view), for a RoPE model that has no scaling of its own."""
    scheme = model.transformer.pos
    if not isinstance(scheme, RoPE) or not scheme.rope_types or model.config.rope_scaling:  # xPos takes no scaling
        return {}
    factor = max_len / trained_len
    return {ROPE_SCALING[m].label: scaling_dict(m, factor, trained_len) for m in ROPE_SCALING}


# ----------------------------------------------------------------------------- 2. decay

def decay_bound(inv_freq, distances):
    """RoFormer §3.4.3: |q·R(r)k| <= max|h| · Σ_j |S_j| with S_j = Σ_{k<j} e^{i r θ_k}; returned relative to
    its value at distance 0 (Σ_j j), for each distance r: 1 at r = 0, falling with r."""
    inv_freq = torch.as_tensor(inv_freq, dtype=torch.float64)
    angles = torch.as_tensor(distances, dtype=torch.float64)[:, None] * inv_freq  # (n_distances, d/2)
    partial = torch.polar(torch.ones_like(angles), angles).cumsum(-1).abs()  # |S_j|, j = 1 .. d/2
    at_zero = torch.arange(1, inv_freq.numel() + 1, dtype=torch.float64).sum()  # |S_j| = j at distance 0
    return (partial.sum(-1) / at_zero).tolist()


# ----------------------------------------------------------------------------- 3. attention

def distance_edges(max_len, base_len):
    """Bucket edges of relative distance: 0, then doubling up to max_len, with base_len among them."""
    edges, e = {0, 1, base_len, max_len}, 2
    while e < max_len:
        edges.add(e)
        e *= 2
    return sorted(x for x in edges if x <= max_len)


class AttentionStats:
    """What the probe keeps per layer, summed over documents, heads and blocks of queries, on the model's device:
    per-query vectors and per-bucket sums, never a (query, key) matrix beyond one block."""

    def __init__(self, n_layer, T, base_len, device="cpu"):
        self.T, self.L = T, base_len
        self.edges = distance_edges(T, base_len)
        self.from_edges = torch.tensor([*self.edges, base_len], device=device)  # the buckets' lower edges, then L
        self.mass = torch.zeros(n_layer, 2, len(self.edges) - 1, dtype=torch.float64, device=device)  # [layer,
        # before/past L, bucket]: sums over queries, divided by the queries on each side in `mass_share`
        self.entropy = torch.zeros(n_layer, T, dtype=torch.float64, device=device)
        self.far = torch.zeros(n_layer, T, dtype=torch.float64, device=device)  # attention at distances >= L, per query

    def __call__(self, layer, probs, q_pos, k_pos):
        """probs (B, nh, rows, keys) of the queries at q_pos over the keys at consecutive positions k_pos (one
        block). A query's keys at distance >= e are a prefix of its keys, so one cumulative sum over the keys
        gives the mass beyond every edge, and each bucket's mass is the difference of two of them."""
        p = probs.sum((0, 1)).double()  # (rows, keys) summed over documents and heads
        beyond = torch.cat((torch.zeros_like(p[:, :1]), p.cumsum(-1)), dim=-1)  # [:, m]: the first m keys' mass
        last_key = q_pos[:, None] - self.from_edges[None, :] - k_pos[0]  # the last key at distance >= each edge
        at_least = beyond.gather(1, (last_key + 1).clamp(0, k_pos.numel()))  # (rows, edges + 1)
        in_bucket = at_least[:, :-2] - at_least[:, 1:-1]  # (rows, buckets): mass at edges[b] <= distance < edges[b+1]
        past = q_pos >= self.L
        self.mass[layer, 0] += in_bucket[~past].sum(0)
        self.mass[layer, 1] += in_bucket[past].sum(0)
        self.entropy[layer, q_pos] -= torch.special.xlogy(probs, probs).sum(-1).sum((0, 1)).double()
        self.far[layer, q_pos] += at_least[:, -1]  # mass at distance >= L

    def mass_share(self, layer):
        """Attention mass per distance bucket, before and past L: the mean over the queries on each side."""
        queries = torch.tensor([min(self.T, self.L), max(0, self.T - self.L)], dtype=torch.float64)
        return (self.mass[layer].cpu() / queries.clamp(min=1)[:, None])


def far_share(probs, base_len, q_pos=None, k_pos=None):
    """Per query (last dim of keys summed): the attention on keys at distance >= base_len, distances a model
    trained at base_len never saw. probs (..., Tq, Tk) with queries at q_pos and keys at k_pos (default 0..T-1)."""
    q_pos = torch.arange(probs.size(-2), device=probs.device) if q_pos is None else q_pos
    k_pos = torch.arange(probs.size(-1), device=probs.device) if k_pos is None else k_pos
    return (probs * ((q_pos[:, None] - k_pos[None, :]) >= base_len)).sum(-1)


@torch.no_grad()
def attention_analysis(model, docs, base_len, max_len, bins):
    """Run the model on each document with the attention probe on; also its loss per position."""
    T = max_len
    device = model.lm_head.weight.device
    stats = AttentionStats(model.config.n_layer, T, base_len, device)
    losses = []
    for d in docs:
        x = torch.from_numpy(np.asarray(d[:T], dtype=np.int64))[None].to(device)
        y = torch.from_numpy(np.asarray(d[1:T + 1], dtype=np.int64))[None].to(device)
        with record_attention(model, stats):
            losses.append(model(x, y, reduction="none")[1][0].float().cpu())
    n = len(docs) * model.config.n_head  # documents x heads summed
    entropy, far = stats.entropy.cpu(), stats.far.cpu()
    per_bin = lambda v: [v[i:i + bins].mean().item() for i in range(0, T, bins)]  # noqa: E731
    loss = torch.stack(losses).mean(0)
    layers = []
    for layer in range(model.config.n_layer):
        mass = stats.mass_share(layer) / n  # mean over documents and heads
        layers.append({"mass_before_L": mass[0].tolist(), "mass_past_L": mass[1].tolist() if T > base_len else None,
                       "entropy": per_bin(entropy[layer] / n), "far_share": per_bin(far[layer] / n),
                       "far_share_past_L": (far[layer, base_len:].mean() / n).item() if T > base_len else 0.0})
    return {"n_docs": len(docs), "edges": stats.edges, "bins": bins, "layers": layers, "loss": per_bin(loss)}


# ----------------------------------------------------------------------------- the command

def explain(cfg: ExplainConfig) -> Path:
    """Compute every section, write explain.md, explain.json and the PNGs to the out_dir; returns explain.md."""
    device = resolve_device(cfg.device)
    model, ckpt = model_from_checkpoint(cfg.ckpt, device, override_scaling=cfg.rope_scaling)
    L = training_length(model)  # the length the weights were first trained at
    trained_len = model.config.block_size  # the length it was last trained at (longer for a fine-tune)
    max_len = cfg.max_len or 8 * L
    scheme = model.transformer.pos
    if scheme.max_len is not None and max_len > scheme.max_len:
        raise ConfigError(f"max_len={max_len} is past what this model can run: {scheme.too_long(max_len)}; "
                          f"explain it with --max_len={scheme.max_len} (its table ends there, which is why it "
                          "cannot go on)")
    data_dir = cfg.data_dir or (ckpt.get("config") or {}).get("data_dir", "")
    check_vocabulary(ckpt.get("data"), data_identity(data_dir), f"checkpoint {cfg.ckpt}")
    out_dir = Path(cfg.out_dir or Path(cfg.ckpt).parent / "explain")
    with claim(out_dir, False, cfg.overwrite, what="explanation"):
        if cfg.overwrite:
            clear(out_dir)
        result = {"ckpt": str(cfg.ckpt), "pos_encoding": model.config.pos_encoding, "L": L,
                  "trained_len": trained_len, "max_len": max_len, "rope_scaling": model.config.rope_scaling}
        own, _, _ = frequencies_of(model, seq_len=max_len)
        if own is not None:  # the frequencies the weights were trained with: the checkpoint's own scaling
            trained_scaling = ckpt["config"]["model"].get("rope_scaling")
            trained, _, _ = frequencies_of(model, trained_scaling, seq_len=trained_len)
            distances = list(range(max_len))  # every distance: the bound oscillates, the figure bins it
            result["angles"] = {"own": angle_coverage(own, trained_len, max_len, trained)}
            result["decay"] = {"distances": distances, "own": decay_bound(own, distances)}
            for label, scaling in scalings_for(model, trained_len, max_len).items():
                inv, _, _ = frequencies_of(model, scaling, seq_len=max_len)
                result["angles"][label] = angle_coverage(inv, trained_len, max_len, trained)
                result["decay"][label] = decay_bound(inv, distances)
        if hasattr(scheme, "slopes"):
            result["alibi_slopes"] = scheme.slopes.tolist()
        docs, note = held_out_documents(data_dir, max_len + 1, cfg.n_docs, cfg.train_docs)
        result["documents"] = note
        result["attention"] = attention_analysis(model, docs, L, max_len, max(1, L // 4))
        write_atomic(out_dir / "explain.json", json.dumps(result, indent=1))
        return write_explanation(result, out_dir)


def main(argv=None):
    cfg = parse(ExplainConfig, argv, doc=__doc__)
    if not cfg.ckpt:
        raise ConfigError("missing --ckpt: e.g. python explain.py --ckpt=out/cpu_rope/ckpt.pt")
    path = explain(cfg)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    cli(main, errors=(ValueError, OSError, CheckpointError))
