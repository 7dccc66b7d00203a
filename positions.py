"""Position schemes: one small class each, one registry (SCHEMES, at the end of this file).

A scheme acts in exactly one of three places, and the model calls every hook unconditionally:
  embed(pos)                         -> (T, C) added to the token embeddings    learned, sinusoidal
  rotate(q, k, pos, layer)           -> q and k rotated by their positions      rope
  attn_bias(q_pos, k_pos, layer)     -> (nh, Tq, Tk) additive logit bias        alibi
plus `score_mod(layer)`, the FlexAttention form of the same bias, so a GPU never builds a T x T tensor.
The hooks see the layer index, so a per-layer scheme (NoPE on some layers, another theta on local layers)
is one class too.

A scheme also owns its facts, which the rest of the code asks instead of branching on names:
  max_len                 the longest sequence it can run (learned: its table; None: unbounded)
  rope_types, no_scaling  the rope_scaling types it accepts, and why it refuses the others
  check_config(config)    its own checks of a GPTConfig (called when the config is made)
  cache_key(seq_len)      changes when what a position means changes with the length (dynamic NTK)

Papers: learned absolute (GPT-2), sinusoidal (Vaswani et al. 2017), ALiBi (Press et al. 2021, "Train
Short, Test Long"), RoPE (Su et al. 2021, RoFormer), none (NoPE: causal masking alone). RoPE scaling
(linear = Position Interpolation, ntk, dynamic, yarn, llama3, longrope, proportional) is in rope_scaling.py.
"""

import math

import torch
import torch.nn as nn

from rope_scaling import ROPE_SCALING, check_scaling, length_dependent, rope_frequencies


def rope_cos_sin(pos, inv_freq, attention_factor=1.0):
    """cos, sin tables (T, d/2) in fp32 for integer positions. Angles are formed in float64: in fp32,
    m * theta_i at m = 32k is off by ~2e-3 rad, a known long-context precision bug."""
    angles = pos.to("cpu", torch.float64)[:, None] * inv_freq.to(torch.float64)[None, :]
    cos, sin = (angles.cos() * attention_factor).float(), (angles.sin() * attention_factor).float()
    return cos.to(pos.device), sin.to(pos.device)


def apply_rope(x, cos, sin, layout="half"):
    """Rotate the first 2*cos.size(-1) dims of x (..., T, hs); the rest (partial rotary) pass through.
    half: dim i pairs with i + d/2 (GPT-NeoX, Hugging Face); interleaved: 2i with 2i+1 (Meta, GPT-J)."""
    d = 2 * cos.size(-1)
    xr, rest = x[..., :d].float(), x[..., d:]
    if layout == "half":
        x1, x2 = xr[..., : d // 2], xr[..., d // 2:]
        out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    else:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return torch.cat((out.type_as(x), rest), dim=-1)


def alibi_slopes(n_head):
    """Head slopes from the ALiBi paper: a geometric sequence; for non powers of two, the p slopes of
    the nearest lower power of two, then every other slope of the 2p-head list."""
    def power_of_two(n):
        return [2 ** (-8 * (h + 1) / n) for h in range(n)]

    p = 2 ** math.floor(math.log2(n_head))
    return power_of_two(p) + power_of_two(2 * p)[0::2][: n_head - p]


def sinusoidal_table(pos, C):
    """PE[pos, 2i] = sin(pos / 10000^(2i/C)), PE[pos, 2i+1] = cos(same); float64 angles, fp32 result."""
    i = torch.arange(0, C, 2, dtype=torch.float64)
    angles = pos.to(torch.float64)[:, None] / 10000 ** (i / C)
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2).float()  # (T, C)


class PositionScheme(nn.Module):
    """No-op hooks and the facts of a scheme that has no positions to scale; a scheme overrides what it changes."""

    rope_types = ()  # rope_scaling types this scheme accepts
    no_scaling = "it has no positions to scale"  # why it refuses any other type

    def __init__(self, config):
        super().__init__()

    @classmethod
    def check_config(cls, config):
        """Raise ValueError (one line) if this scheme cannot run `config`; called by GPTConfig."""
        scaling = check_scaling(config.rope_scaling)
        if scaling is not None and scaling["rope_type"] not in cls.rope_types:
            raise ValueError(f"pos_encoding {config.pos_encoding!r} cannot use rope_scaling "
                             f"{scaling['rope_type']!r}: {cls.no_scaling}")

    max_len = None  # the longest sequence this scheme can run; None: any length

    def check_length(self, seq_len):
        if self.max_len is not None and seq_len > self.max_len:
            raise ValueError(self.too_long(seq_len))

    def too_long(self, seq_len):
        return f"sequence of {seq_len} tokens is longer than this position scheme runs ({self.max_len})"

    def prepare(self, seq_len, device):
        """Called once per forward with the total length (cached keys included): build tables here."""

    def cache_key(self, seq_len):
        """Changes when what a position means changes with the length: cached keys and values computed under
        another key are stale, and the model recomputes them."""
        return None

    def embed(self, pos):
        return None

    def rotate(self, q, k, pos, layer):
        return q, k

    def attn_bias(self, q_pos, k_pos, layer):
        return None

    def score_mod(self, layer):
        return None


class NoPE(PositionScheme):
    """No positions at all (the control): order is known only through the causal mask."""

    no_scaling = "it has no position encoding (NoPE), so there is nothing to scale"


class Learned(PositionScheme):
    """GPT-2's learned absolute table: block_size rows and not one more, so it cannot extrapolate."""

    no_scaling = ("learned positions cannot be scaled: positions past the table were never trained; "
                  "train a rope model (with rope_scaling) or sinusoidal to extend the context")

    def __init__(self, config):
        super().__init__(config)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)

    @property
    def max_len(self):
        return self.wpe.num_embeddings

    def too_long(self, seq_len):
        return (f"sequence of {seq_len} tokens is past the learned position table: this model was trained with "
                f"{self.max_len} positions and learned embeddings cannot extrapolate; use sinusoidal, rope, alibi "
                "or none to run longer, or crop the input")

    def embed(self, pos):
        return self.wpe(pos)


class Sinusoidal(PositionScheme):
    """Fixed sin/cos table (Vaswani et al.); 'linear' scaling interpolates it (positions / factor).

    Added at the size of the token embeddings, the paper's ratio (its tokens: std d^-1/2 times sqrt(d)).
    Unscaled next to GPT-2's std-0.02 embeddings, positions drown the tokens (35x) and the model trains
    worse than one with no positions at all.
    """

    rope_types = ("linear",)
    no_scaling = "sinusoidal positions can only be interpolated (rope_type 'linear')"
    scale = 0.02 * math.sqrt(2)  # table RMS 1/sqrt(2) -> 0.02, GPT-2's token embedding std at init

    def __init__(self, config):
        super().__init__(config)
        self.n_embd = config.n_embd
        self.factor = float(config.rope_scaling["factor"]) if config.rope_scaling else 1.0
        self.register_buffer("table", torch.empty(0), persistent=False)

    def prepare(self, seq_len, device):
        if self.table.size(0) < seq_len or self.table.device != device:
            n = max(seq_len, 2 * self.table.size(0))  # grow by doubling
            self.table = sinusoidal_table(torch.arange(n) / self.factor, self.n_embd).to(device)

    def embed(self, pos):
        return self.table[pos] * self.scale


class ALiBi(PositionScheme):
    """Attention with Linear Biases: logit -= slope_h * (i - j). No parameters, no table, no scaling."""

    no_scaling = "ALiBi needs no scaling: its bias depends only on distance, so it runs at any length as it is"

    def __init__(self, config):
        super().__init__(config)
        self.register_buffer("slopes", torch.tensor(alibi_slopes(config.n_head)), persistent=False)
        self._score_mod = None
        self._last = None  # (q_pos, k_pos, bias) of the last call

    def attn_bias(self, q_pos, k_pos, layer):
        # The same bias for every layer: built by the first layer of a forward, reused by the others (the model
        # passes every layer the same position tensors). Compiled, it is fused into the graph instead.
        if torch.compiler.is_compiling():
            return self.bias(q_pos, k_pos)
        if self._last is None or self._last[0] is not q_pos or self._last[1] is not k_pos:
            self._last = (q_pos, k_pos, self.bias(q_pos, k_pos))
        return self._last[2]

    def bias(self, q_pos, k_pos):
        distance = (q_pos[:, None] - k_pos[None, :]).float()  # (Tq, Tk)
        return -self.slopes.float()[:, None, None] * distance  # (nh, Tq, Tk); fp32 even after model.half()

    def score_mod(self, layer):
        # One function per device, the same for every layer: a new function object would recompile FlexAttention.
        if getattr(self._score_mod, "device", None) != self.slopes.device:
            slopes = self.slopes

            def alibi(score, b, h, q_idx, kv_idx):
                return score - slopes[h] * (q_idx - kv_idx)

            alibi.device = slopes.device
            self._score_mod = alibi
        return self._score_mod


class RoPE(PositionScheme):
    """Rotary position embedding (RoFormer) with partial rotary, both pairings and optional scaling.

    cos/sin are fp32, built from integer positions (never stored in bf16, even after model.to(bf16)).
    """

    rope_types = ROPE_SCALING  # every registered scaling method, including ones added later

    def __init__(self, config):
        super().__init__(config)
        self.rot_dim = self.rotated_dim(config)
        self.layout, self.theta, self.scaling = config.rope_layout, config.rope_theta, check_scaling(config.rope_scaling)
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self._table_key = None

    @classmethod
    def check_config(cls, config):
        super().check_config(config)
        scaling = check_scaling(config.rope_scaling)
        if scaling is not None and ROPE_SCALING[scaling["rope_type"]].whole_head and config.rotary_fraction != 1:
            raise ValueError(f"rope_type {scaling['rope_type']!r} gives frequencies for the whole head (zero for the "
                             "pairs it leaves unrotated): set rotary_fraction=1 and its fraction as rope_scaling "
                             "partial_rotary_factor")
        rope_frequencies(cls.rotated_dim(config), config.rope_theta, scaling)  # options that must fit the head

    @staticmethod
    def rotated_dim(config):
        hs = config.n_embd // config.n_head
        rot_dim = int(hs * config.rotary_fraction)
        if rot_dim < 2 or rot_dim % 2:
            raise ValueError(f"RoPE rotates head_dim * rotary_fraction = {hs} * {config.rotary_fraction} = "
                             f"{rot_dim} dims; it must be an even number >= 2")
        return rot_dim

    def cache_key(self, seq_len):
        # Only a length-dependent method (dynamic NTK, LongRoPE) changes meaning with the length: key = its frequencies.
        if not length_dependent(self.scaling):
            return None
        inv_freq, attention_factor = rope_frequencies(self.rot_dim, self.theta, self.scaling, seq_len)
        return inv_freq.numpy().tobytes(), attention_factor

    def prepare(self, seq_len, device):
        """Build cos/sin for positions 0..seq_len-1, only when they must change."""
        key = self.cache_key(seq_len)
        if (self.cos.size(0) < seq_len or key != self._table_key or self.cos.device != device
                or self.cos.dtype != torch.float32):
            n = max(seq_len, 2 * self.cos.size(0)) if self.cos.size(0) < seq_len else self.cos.size(0)  # doubling
            inv_freq, attention_factor = rope_frequencies(self.rot_dim, self.theta, self.scaling, seq_len)
            self.cos, self.sin = rope_cos_sin(torch.arange(n, device=device), inv_freq, attention_factor)
            self._table_key = key

    def rotate(self, q, k, pos, layer):
        cos, sin = self.cos[pos], self.sin[pos]  # (T, rot_dim / 2)
        return apply_rope(q, cos, sin, self.layout), apply_rope(k, cos, sin, self.layout)


def layout_permutation(head_dim, rot_dim, to_layout):
    """Index list p with W_new = W_old[p] (per head) converting q/k rows between the two RoPE pairings."""
    to_half = list(range(0, rot_dim, 2)) + list(range(1, rot_dim, 2))  # interleaved -> half
    perm = to_half if to_layout == "half" else sorted(range(rot_dim), key=to_half.__getitem__)
    return perm + list(range(rot_dim, head_dim))


def permute_rope_layout(state_dict, config, to_layout):
    """Convert a RoPE model's q and k projections to `to_layout` ('half' or 'interleaved').
    A checkpoint is only right with its own pairing; this makes the same model in the other one."""
    C, nh = config.n_embd, config.n_head
    hs = C // nh
    perm = torch.tensor(layout_permutation(hs, RoPE.rotated_dim(config), to_layout))
    rows = torch.cat([h * hs + perm for h in range(2 * nh)])  # q heads then k heads; v untouched
    out = dict(state_dict)
    for name, w in state_dict.items():
        if name.endswith("attn.c_attn.weight") or name.endswith("attn.c_attn.bias"):
            w = w.clone()
            w[: 2 * C] = w[: 2 * C][rows]
            out[name] = w
    return out


SCHEMES = {"learned": Learned, "sinusoidal": Sinusoidal, "alibi": ALiBi, "rope": RoPE, "none": NoPE}
