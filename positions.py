"""Position schemes: one small class each, one registry.

A scheme acts in exactly one of three places, and the model calls all three hooks unconditionally:
  embed(pos)                  -> (T, C) added to the token embeddings    learned, sinusoidal
  rotate(q, k, pos)           -> q and k rotated by their positions      rope
  attn_bias(q_pos, k_pos)     -> (nh, Tq, Tk) additive logit bias        alibi
plus `score_mod()`, the FlexAttention form of the same bias, so a GPU never builds a T x T float tensor.

Papers: learned absolute (GPT-2), sinusoidal (Vaswani et al. 2017), ALiBi (Press et al. 2021,
"Train Short, Test Long"), RoPE (Su et al. 2021, RoFormer), none (NoPE: causal masking alone).
RoPE scaling: linear = Position Interpolation (Chen et al. 2023), ntk (NTK-aware base change), dynamic NTK,
YaRN (Peng et al. 2023), llama3. Formulas and reference values: ../shared/REFERENCE.md.
"""

import math

import torch
import torch.nn as nn

ROPE_TYPES = ("linear", "ntk", "dynamic", "yarn", "llama3")
SCALING_KEYS = {"rope_type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
                "attention_factor", "truncate", "low_freq_factor", "high_freq_factor"}


def check_scaling(scaling):
    """Validate a Hugging Face style `rope_scaling` dict; raise one clear ValueError line if it is wrong."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling must be a dict like {{'rope_type': 'linear', 'factor': 4}}, got {scaling!r}")
    unknown = set(scaling) - SCALING_KEYS
    if unknown:
        raise ValueError(f"unknown rope_scaling key(s) {sorted(unknown)}; valid keys: {sorted(SCALING_KEYS)}")
    kind = scaling.get("rope_type")
    if kind not in ROPE_TYPES:
        raise ValueError(f"unknown rope_type {kind!r}; choose one of {', '.join(ROPE_TYPES)}")
    if not float(scaling.get("factor", 0)) >= 1.0:
        raise ValueError(f"rope_scaling needs a factor >= 1 (the context multiple), got {scaling.get('factor')!r}")
    if kind != "linear" and "original_max_position_embeddings" not in scaling:
        raise ValueError(f"rope_type {kind!r} needs original_max_position_embeddings (the training length)")
    return scaling


def rope_frequencies(head_dim, theta, scaling=None, seq_len=None):
    """Inverse frequencies (float64, head_dim/2) and attention_factor for RoPE with optional scaling.

    cos and sin get multiplied by attention_factor, so attention logits scale by its square (YaRN).
    `seq_len` matters only for dynamic NTK, whose base grows with the current length.
    """
    d = head_dim
    i = torch.arange(0, d, 2, dtype=torch.float64)
    inv_freq = theta ** (-i / d)
    if check_scaling(scaling) is None:
        return inv_freq, 1.0
    kind, s = scaling["rope_type"], float(scaling["factor"])
    L = scaling.get("original_max_position_embeddings")
    if kind == "linear":  # Position Interpolation: position m behaves like m / s
        return inv_freq / s, 1.0
    if kind == "ntk":  # NTK-aware: stretch the base so the lowest frequency interpolates by s
        return (theta * s ** (d / (d - 2))) ** (-i / d), 1.0
    if kind == "dynamic":  # NTK with the factor grown to the current length; unchanged up to L
        ell = max(seq_len or L, L)
        return (theta * ((s * ell / L) - (s - 1)) ** (d / (d - 2))) ** (-i / d), 1.0
    if kind == "yarn":
        return _yarn(inv_freq, d, theta, s, L, scaling)
    return _llama3(inv_freq, s, L, scaling)


def _yarn(inv_freq, d, theta, s, L, scaling):
    """YaRN: interpolate the low frequencies, keep the high ones, ramp between (by rotations per L)."""
    def correction_dim(rotations):  # the dimension that turns `rotations` times over L positions
        return d * math.log(L / (2 * math.pi * rotations)) / (2 * math.log(theta))

    low, high = correction_dim(scaling.get("beta_fast", 32)), correction_dim(scaling.get("beta_slow", 1))
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # avoid a division by zero in the ramp
    ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    attention_factor = scaling.get("attention_factor") or (0.1 * math.log(s) + 1.0 if s > 1 else 1.0)
    return inv_freq / s * ramp + inv_freq * (1 - ramp), float(attention_factor)


def _llama3(inv_freq, s, L, scaling):
    """Llama 3: keep short wavelengths, divide long ones by s, blend the band between."""
    low_ff, high_ff = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    wavelen = 2 * math.pi / inv_freq
    gamma = ((L / wavelen - low_ff) / (high_ff - low_ff)).clamp(0, 1)  # 1 = keep, 0 = interpolate
    blended = (1 - gamma) * inv_freq / s + gamma * inv_freq
    out = torch.where(wavelen > L / low_ff, inv_freq / s, blended)
    return torch.where(wavelen < L / high_ff, inv_freq, out), 1.0


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


def layout_permutation(head_dim, rot_dim, to_layout):
    """Index list p with W_new = W_old[p] (per head) converting q/k rows between the two RoPE pairings."""
    to_half = list(range(0, rot_dim, 2)) + list(range(1, rot_dim, 2))  # interleaved -> half
    perm = to_half if to_layout == "half" else sorted(range(rot_dim), key=to_half.__getitem__)
    return perm + list(range(rot_dim, head_dim))


def permute_rope_layout(state_dict, config, to_layout):
    """Convert a RoPE checkpoint's q and k projections to `to_layout` ('half' or 'interleaved').
    A checkpoint is only right with its own pairing; this makes the same model in the other one."""
    C, nh = config.n_embd, config.n_head
    hs = C // nh
    rot_dim = RoPE.rotated_dim(config)
    perm = torch.tensor(layout_permutation(hs, rot_dim, to_layout))
    rows = torch.cat([h * hs + perm for h in range(2 * nh)])  # q heads then k heads; v untouched
    out = dict(state_dict)
    for name, w in state_dict.items():
        if name.endswith("attn.c_attn.weight") or name.endswith("attn.c_attn.bias"):
            w = w.clone()
            w[: 2 * C] = w[: 2 * C][rows]
            out[name] = w
    return out


def alibi_slopes(n_head):
    """Head slopes from the ALiBi paper: a geometric sequence; for non powers of two, the p slopes of
    the nearest lower power of two, then every other slope of the 2p-head list."""
    def power_of_two(n):
        start = 2 ** (-8 / n)
        return [start ** (h + 1) for h in range(n)]

    p = 2 ** math.floor(math.log2(n_head))
    return power_of_two(p) + power_of_two(2 * p)[0::2][: n_head - p]


def sinusoidal_table(pos, C):
    """PE[pos, 2i] = sin(pos / 10000^(2i/C)), PE[pos, 2i+1] = cos(same); float64 angles, fp32 result."""
    i = torch.arange(0, C, 2, dtype=torch.float64)
    angles = pos.to(torch.float64)[:, None] / 10000 ** (i / C)
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2).float()  # (T, C)


class PositionScheme(nn.Module):
    """No-op hooks; a scheme overrides the one place where it acts."""

    scalable = ()  # rope_types this scheme accepts in config.rope_scaling

    def __init__(self, config):
        super().__init__()
        if config.rope_scaling is not None and config.rope_scaling.get("rope_type") not in self.scalable:
            raise ValueError(self.no_scaling_reason(config))

    def no_scaling_reason(self, config):
        return f"position scheme {config.pos_encoding!r} cannot use rope_scaling; remove it"

    def prepare(self, seq_len, device):
        """Called once per forward with the total length (cached keys included): build tables, or raise
        if positions 0..seq_len-1 cannot be represented."""

    def cache_key(self, seq_len):
        """Changes when what a position means changes with the length (dynamic NTK): cached keys and values
        computed under another key are stale, and the model recomputes them."""
        return None

    def embed(self, pos):
        return None

    def rotate(self, q, k, pos):
        return q, k

    def attn_bias(self, q_pos, k_pos):
        return None

    def score_mod(self):
        return None


class NoPE(PositionScheme):
    """No positions at all (the control): order is known only through the causal mask."""


class Learned(PositionScheme):
    """GPT-2's learned absolute table: block_size rows and not one more, so it cannot extrapolate."""

    def __init__(self, config):
        super().__init__(config)
        self.n_positions = config.block_size
        self.wpe = nn.Embedding(config.block_size, config.n_embd)

    def no_scaling_reason(self, config):
        return ("learned positions cannot be scaled: positions past the table were never trained; "
                "use rope (with rope_scaling) or sinusoidal to extend the context")

    def prepare(self, seq_len, device):
        if seq_len > self.n_positions:
            raise ValueError(
                f"sequence of {seq_len} tokens is past the learned position table: this model was trained with "
                f"{self.n_positions} positions and learned embeddings cannot extrapolate; use sinusoidal, "
                "rope, alibi or none to run longer, or crop the input")

    def embed(self, pos):
        return self.wpe(pos)


class Sinusoidal(PositionScheme):
    """Fixed sin/cos table (Vaswani et al.); 'linear' scaling interpolates it (positions / factor)."""

    scalable = ("linear",)

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
        return self.table[pos]


class ALiBi(PositionScheme):
    """Attention with Linear Biases: logit -= slope_h * (i - j). No parameters, no table, no scaling."""

    def __init__(self, config):
        super().__init__(config)
        self.register_buffer("slopes", torch.tensor(alibi_slopes(config.n_head)), persistent=False)
        self._score_mod = None

    def no_scaling_reason(self, config):
        return "ALiBi needs no scaling: its bias depends only on distance and runs at any length; remove rope_scaling"

    def attn_bias(self, q_pos, k_pos):
        distance = (q_pos[:, None] - k_pos[None, :]).float()  # (Tq, Tk)
        return -self.slopes.float()[:, None, None] * distance  # (nh, Tq, Tk); fp32 even after model.half()

    def score_mod(self):
        # Built once per device: a new function object on every call would recompile FlexAttention.
        if self._score_mod is None or self._score_mod.device != self.slopes.device:
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

    scalable = ROPE_TYPES

    def no_scaling_reason(self, config):  # only an unknown rope_type gets here
        return f"unknown rope_type {config.rope_scaling.get('rope_type')!r}; choose one of {', '.join(ROPE_TYPES)}"

    def __init__(self, config):
        super().__init__(config)
        self.rot_dim = self.rotated_dim(config)
        self.layout, self.theta = config.rope_layout, config.rope_theta
        self.scaling = check_scaling(config.rope_scaling)
        dynamic = self.scaling is not None and self.scaling["rope_type"] == "dynamic"
        self.dynamic_from = self.scaling["original_max_position_embeddings"] if dynamic else None
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self._table_key = None

    @staticmethod
    def rotated_dim(config):
        hs = config.n_embd // config.n_head
        rot_dim = int(hs * config.rotary_fraction)
        if rot_dim < 2 or rot_dim % 2:
            raise ValueError(f"RoPE rotates head_dim * rotary_fraction = {hs} * {config.rotary_fraction} = "
                             f"{rot_dim} dims; it must be an even number >= 2")
        if config.rope_layout not in ("half", "interleaved"):
            raise ValueError(f"rope_layout must be 'half' or 'interleaved', got {config.rope_layout!r}")
        return rot_dim

    def cache_key(self, seq_len):
        # dynamic NTK: frequencies depend on the exact length once it passes the original one
        return seq_len if self.dynamic_from is not None and seq_len > self.dynamic_from else None

    def prepare(self, seq_len, device):
        """Build cos/sin for positions 0..seq_len-1, only when they must change."""
        key = self.cache_key(seq_len)
        if (self.cos.size(0) < seq_len or key != self._table_key or self.cos.device != device
                or self.cos.dtype != torch.float32):
            n = seq_len if key is not None else max(seq_len, 2 * self.cos.size(0))  # grow by doubling
            inv_freq, attention_factor = rope_frequencies(self.rot_dim, self.theta, self.scaling, seq_len)
            self.cos, self.sin = rope_cos_sin(torch.arange(n, device=device), inv_freq, attention_factor)
            self._table_key = key

    def rotate(self, q, k, pos):
        cos, sin = self.cos[pos], self.sin[pos]  # (T, rot_dim / 2)
        return apply_rope(q, cos, sin, self.layout), apply_rope(k, cos, sin, self.layout)


SCHEMES = {"learned": Learned, "sinusoidal": Sinusoidal, "alibi": ALiBi, "rope": RoPE, "none": NoPE}
