"""Position schemes: one small class each, one registry (SCHEMES, at the end of this file).

A scheme acts in exactly one of four places, and the model calls every hook unconditionally:
  embed(pos)                         -> (T, C) added to the token embeddings    learned, sinusoidal
  rotate(q, k, pos, layer)           -> q and k rotated by their positions      rope, rope_nope, xpos
  attn_bias(q_pos, k_pos, layer)     -> (nh, Tq, Tk) additive logit bias        alibi, t5, kerple, fire
  attend(q, k, v, ..., gates, probe) -> the attention output, formed itself     cope, fox (gates(x, layer): its
                                                                                per-token input, kept in the cache)
plus `score_mod(layer)`, the FlexAttention form of the same bias, so a GPU never builds a T x T tensor.
The hooks see the layer index, so a per-layer scheme (NoPE on some layers, another theta on local layers)
is one class too.

A scheme also owns its facts, which the rest of the code asks instead of branching on names:
  max_len                 the longest sequence it can run (learned: its table; None: unbounded)
  rope_types, no_scaling  the rope_scaling types it accepts, and why it refuses the others
  check_config(config)    its own checks of a GPTConfig (called when the config is made)
  options                 its own keys of GPTConfig.pos_options, with their defaults (option_values)
  cache_key(seq_len)      changes when what a position means changes with the length (dynamic NTK)
  no_export               why no transformers architecture computes it exactly (scripts/export_hf.py refuses with it)

Papers: learned absolute (GPT-2), sinusoidal (Vaswani et al. 2017), ALiBi (Press et al. 2021, "Train
Short, Test Long"), RoPE (Su et al. 2021, RoFormer), none (NoPE: causal masking alone), rope_nope (RoPE with NoPE
layers: Yang et al. 2025, SmolLM3, Llama 4's iRoPE with its attention temperature), t5 (T5's bucketed relative
bias, Raffel et al. 2020), kerple (Chi et al. 2022, KERPLE's learned kernel bias), fire (Li et al. 2023, an MLP of
the interpolated distance), xpos (Sun et al. 2022, RoPE with an exponential decay), cope (Golovneva et al. 2024,
contextual positions), fox (Lin et al. 2025, the Forgetting Transformer's data-dependent forget gate). RoPE scaling (linear = Position
Interpolation, ntk, dynamic, yarn, llama3, longrope, proportional, direct, abf) is in posenc/rope_scaling.py.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from posenc.attention import attention_by_distance, block_rows, consecutive, explicit_attention
from posenc.rope_scaling import ROPE_SCALING, check_scaling, length_dependent, original_length, rope_frequencies


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


def sinusoidal_table(pos, C, base=10000.0):
    """PE[pos, 2i] = sin(pos / base^(2i/C)), PE[pos, 2i+1] = cos(same); float64 angles, fp32 result."""
    i = torch.arange(0, C, 2, dtype=torch.float64)
    angles = pos.to(torch.float64)[:, None] / base ** (i / C)
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2).float()  # (T, C)


def t5_buckets(distance, num_buckets=32, max_distance=128):
    """T5's causal bucket of each distance i - j (query i, key j): distances below num_buckets // 2 are their own
    bucket, the other half of the buckets are log-spaced up to max_distance, and farther ones share the last bucket.
    A future key (i < j) is bucket 0, as in T5 (the causal mask hides it anyway). Integer tensor in, long out."""
    d = distance.clamp(min=0)
    exact = num_buckets // 2
    far = exact + (torch.log(d.clamp(min=exact).float() / exact) / math.log(max_distance / exact)
                   * (num_buckets - exact)).long()  # truncation, as T5 does
    return torch.where(d < exact, d, far.clamp(max=num_buckets - 1))


class PositionScheme(nn.Module):
    """No-op hooks and the facts of a scheme that has no positions to scale; a scheme overrides what it changes."""

    rope_types = ()  # rope_scaling types this scheme accepts
    no_scaling = "it has no positions to scale"  # why it refuses any other type
    options = {}  # this scheme's keys of GPTConfig.pos_options -> their defaults
    no_export = None  # why scripts/export_hf.py cannot export it exactly; None: hf.ARCHITECTURES has its architecture

    def __init__(self, config):
        super().__init__()

    @classmethod
    def check_config(cls, config):
        """Raise ValueError (one line) if this scheme cannot run `config`; called by GPTConfig."""
        scaling = check_scaling(config.rope_scaling)
        if scaling is not None and scaling["rope_type"] not in cls.rope_types:
            raise ValueError(f"pos_encoding {config.pos_encoding!r} cannot use rope_scaling "
                             f"{scaling['rope_type']!r}: {cls.no_scaling}")
        cls.option_values(config)

    @classmethod
    def option_values(cls, config):
        """This scheme's options: its defaults, with config.pos_options over them; ValueError on a key it lacks."""
        given = config.pos_options or {}
        unknown = sorted(set(given) - set(cls.options))
        if unknown:
            takes = f"it takes {', '.join(cls.options)}" if cls.options else "it has no options"
            raise ValueError(f"unknown pos_options key(s) {unknown} for pos_encoding {config.pos_encoding!r}: {takes}")
        return cls.options | given

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

    relative_bias = False  # attn_bias depends on q_pos - k_pos alone: posenc/attention.py then builds no mask
    bias_band = None  # and is the same for every distance >= bias_band: its gradient needs only closer pairs

    def score_mod(self, layer):
        return None

    def init_weights(self):
        """Called once the model has initialized every Linear (N(0, 0.02), zero bias): a scheme whose parameters
        start elsewhere sets them here (the forget gate's bias_init)."""

    def gates(self, x, layer):
        """(B, nh, T) fp32 values per token that this scheme's attention reads for every key, from the attention
        layer's input x (B, T, C): the forget gate's log f. None: it reads none. The KV cache keeps them beside the
        keys (model.KVCache.update_gates), so a decoded token sees every earlier token's."""
        return None

    attends_itself = False  # attend always answers (CoPE, the forget gate): no FlexAttention, no static decode step

    def attend(self, q, k, v, q_pos, k_pos, layer, gates=None, probe=None):
        """The attention output (B, nh, Tq, hs) if this scheme computes attention itself, else None (the model's
        kernels): CoPE and the forget gate, and RoPE with Self-Extend. gates: every key's (B, nh, Tk), from gates();
        probe: explain.py's, to be handed each block's probabilities (posenc/attention.py: explicit_attention)."""
        return None


class NoPE(PositionScheme):
    """No positions at all (the control): order is known only through the causal mask."""

    no_scaling = "it has no position encoding (NoPE), so there is nothing to scale"
    no_export = "transformers has no architecture without position information (NoPE)"


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
    worse than one with no positions at all. `base` is the paper's 10000, the wavelengths' ratio; a longer
    training length may raise it, as RoPE's rope_theta, so that as many pairs stay incomplete within L.
    """

    rope_types = ("linear",)
    no_scaling = "sinusoidal positions can only be interpolated (rope_type 'linear')"
    no_export = "transformers has no architecture with fixed sinusoidal positions added to the token embeddings"
    options = {"base": 10000.0}
    scale = 0.02 * math.sqrt(2)  # table RMS 1/sqrt(2) -> 0.02, GPT-2's token embedding std at init

    @classmethod
    def check_config(cls, config):
        super().check_config(config)
        base = cls.option_values(config)["base"]
        if isinstance(base, bool) or not isinstance(base, (int, float)) or not base > 1:
            raise ValueError(f"bad pos_options value {base!r} for 'base' of sinusoidal: expected a number > 1")

    def __init__(self, config):
        super().__init__(config)
        self.n_embd, self.base = config.n_embd, float(self.option_values(config)["base"])
        self.factor = float(config.rope_scaling["factor"]) if config.rope_scaling else 1.0
        self.register_buffer("table", torch.empty(0), persistent=False)

    def prepare(self, seq_len, device):
        if self.table.size(0) < seq_len or self.table.device != device:
            n = max(seq_len, 2 * self.table.size(0))  # grow by doubling
            self.table = sinusoidal_table(torch.arange(n) / self.factor, self.n_embd, self.base).to(device)

    def embed(self, pos):
        return self.table[pos] * self.scale


class SharedBias(PositionScheme):
    """A logit bias that every layer shares, `bias(q_pos, k_pos)` -> (nh, Tq, Tk) in fp32 (even after model.half()).
    The model asks it for one block of queries at a time (posenc/attention.py), so it is built per block, never
    kept: a kept bias would be T x T, and recomputation under checkpointing must build what the forward built."""

    relative_bias = True  # ALiBi's and T5's biases are functions of the distance

    def __init__(self, config):
        super().__init__(config)
        self._score_mod = None

    def attn_bias(self, q_pos, k_pos, layer):
        return self.bias(q_pos, k_pos)


class ALiBi(SharedBias):
    """Attention with Linear Biases: logit -= slope_h * (i - j). No parameters, no table, no scaling."""

    no_scaling = "ALiBi needs no scaling: its bias depends only on distance, so it runs at any length as it is"
    no_export = ("transformers has no architecture with our ALiBi block: Falcon (alibi=True) adds the bias before "
                 "the 1/sqrt(head_dim) scaling (slopes m/sqrt(head_dim)) and builds it in bfloat16; BLOOM normalizes "
                 "the token embeddings (word_embeddings_layernorm); rope and learned export (and scripts/export_gguf.py "
                 "writes ALiBi for llama.cpp)")

    def __init__(self, config):
        super().__init__(config)
        self.register_buffer("slopes", torch.tensor(alibi_slopes(config.n_head)), persistent=False)

    def bias(self, q_pos, k_pos):
        distance = (q_pos[:, None] - k_pos[None, :]).float()  # (Tq, Tk)
        return -self.slopes.float()[:, None, None] * distance  # (nh, Tq, Tk)

    def score_mod(self, layer):
        # One function per device, the same for every layer: a new function object would recompile FlexAttention.
        if getattr(self._score_mod, "device", None) != self.slopes.device:
            slopes = self.slopes

            def alibi(score, b, h, q_idx, kv_idx):
                return score - slopes[h] * (q_idx - kv_idx)

            alibi.device = slopes.device
            self._score_mod = alibi
        return self._score_mod


class T5Bias(SharedBias):
    """T5's relative position bias (Raffel et al. 2020), causal: one learned scalar per (head, distance bucket), one
    table (nh, num_buckets) shared by all layers. Buckets as T5 computes them (t5_buckets): exact for distances below
    num_buckets / 2, log-spaced up to max_distance, and one last bucket for everything farther, so it runs at any
    length. The table starts at zero (at init the model is NoPE; it learns which distances matter) and is decayed
    like every 2-d tensor. On the GPU its score_mod reads the table inside FlexAttention (no T x T tensor); on the CPU
    it is read per block of queries (posenc/attention.py), and its gradient comes from the pairs closer than
    max_distance (bias_band).
    """

    options = {"num_buckets": 32, "max_distance": 128}  # T5's defaults
    no_scaling = ("T5's bias needs no scaling: every distance past max_distance shares its last bucket, so it runs at "
                  "any length as it is")
    no_export = ("transformers has no decoder-only model with T5's bias: T5, mT5, UMT5, LongT5, Switch Transformers, "
                 "Pop2Piano, UDOP and Pix2Struct are encoder-decoders with RMSNorm (T5LayerNorm) where we have "
                 "LayerNorm and no 1/sqrt(head_dim) scaling, and MPNet is a bidirectional encoder")

    def __init__(self, config):
        super().__init__(config)
        o = self.option_values(config)
        self.num_buckets, self.max_distance = o["num_buckets"], o["max_distance"]
        self.bias_band = self.max_distance  # every distance from max_distance on is the last bucket
        self.table = nn.Parameter(torch.zeros(config.n_head, self.num_buckets))  # (nh, num_buckets)

    @classmethod
    def check_config(cls, config):
        super().check_config(config)
        o = cls.option_values(config)
        low = 2
        for key in ("num_buckets", "max_distance"):  # the log-spaced buckets start at num_buckets // 2
            if isinstance(o[key], bool) or not isinstance(o[key], int) or o[key] < low:
                raise ValueError(f"bad pos_options value {o[key]!r} for {key!r} of t5: expected an integer >= {low}")
            low = o[key] // 2 + 1

    def bias(self, q_pos, k_pos):
        # Every distance from max_distance on shares the last bucket, so a lookup over distances 0..max_distance
        # gives each pair's bucket with one gather (no log per pair), at any length.
        lookup = t5_buckets(torch.arange(self.max_distance + 1, device=q_pos.device), self.num_buckets,
                            self.max_distance)
        distance = (q_pos[:, None] - k_pos[None, :]).clamp(0, self.max_distance)  # (Tq, Tk)
        return self.table.float()[:, lookup][:, distance]  # (nh, Tq, Tk)

    def score_mod(self, layer):
        # One function per table and device, the same for every layer (a new function would recompile FlexAttention);
        # it reads the parameter itself, so gradients reach the table.
        if getattr(self._score_mod, "table", None) is not self.table or self._score_mod.device != self.table.device:
            table, num_buckets, max_distance = self.table, self.num_buckets, self.max_distance

            def t5(score, b, h, q_idx, kv_idx):
                return score + table[h, t5_buckets(q_idx - kv_idx, num_buckets, max_distance)]

            t5.table, t5.device = table, table.device
            self._score_mod = t5
        return self._score_mod


def inverse_softplus(y):
    """x with softplus(x) = y (y > 0): the raw value a positive parameter starts from."""
    return y + torch.log(-torch.expm1(-y))


class Kerple(SharedBias):
    """KERPLE (Chi et al. 2022, "Kernelized Relative Positional Embedding for Length Extrapolation"), causal: the
    logarithmic kernel bias -r1 * log(1 + r2 * (i - j)) of query i for key j, or with kernel "power" the power one
    -r1 * (i - j)^r2 (0 < r2 <= 2), r1 and r2 learned per head and shared by every layer (the paper's choice).

    Positivity comes from the parametrization, r = softplus(raw) (r2 of the power kernel: 2 * sigmoid(raw)), not
    from the paper code's clamp after each optimizer step: a clamp is a hook on the training loop, and softplus
    keeps a gradient everywhere. Initial values as the paper's code draws them: r1 ~ U(0, 2), r2 ~ U(0, 1), both
    kept >= 0.01. The bias depends on the distance alone (the CPU blocks' view masks apply in eval); it learns and
    is never constant past a band, so with gradients each block's bias is built and recomputed in backward
    (posenc/attention.py: checkpointed_blocks), in memory linear in T.
    """

    options = {"kernel": "log"}  # "log" (the paper's best) or "power"
    no_scaling = ("Kerple needs no scaling: its bias is a function of the distance, learned to run at any length as "
                  "it is")
    no_export = "transformers has no architecture with Kerple's learned kernel bias"
    KERNELS = ("log", "power")

    def __init__(self, config):
        super().__init__(config)
        self.kernel = self.option_values(config)["kernel"]
        r1 = (torch.rand(config.n_head) * 2).clamp(min=0.01)
        r2 = torch.rand(config.n_head).clamp(min=0.01)
        self.raw_r1 = nn.Parameter(inverse_softplus(r1))  # (nh,)
        self.raw_r2 = nn.Parameter(inverse_softplus(r2) if self.kernel == "log" else torch.logit(r2 / 2))

    @classmethod
    def check_config(cls, config):
        super().check_config(config)
        kernel = cls.option_values(config)["kernel"]
        if kernel not in cls.KERNELS:
            raise ValueError(f"bad pos_options value {kernel!r} for 'kernel' of kerple: choose "
                             f"{' or '.join(cls.KERNELS)}")

    def coefficients(self):
        """(r1, r2), each (nh,) in fp32 and > 0."""
        r1 = F.softplus(self.raw_r1.float())
        r2 = F.softplus(self.raw_r2.float()) if self.kernel == "log" else 2 * torch.sigmoid(self.raw_r2.float())
        return r1, r2

    def kernel_bias(self, distance, r1, r2):
        """The bias at distances >= 0, r1 and r2 broadcast against them."""
        if self.kernel == "log":
            return -r1 * torch.log1p(r2 * distance)
        return -r1 * distance.pow(r2)

    def bias(self, q_pos, k_pos):
        distance = (q_pos[:, None] - k_pos[None, :]).clamp(min=0).float()  # (Tq, Tk); future keys are masked
        r1, r2 = self.coefficients()
        return self.kernel_bias(distance, r1[:, None, None], r2[:, None, None])  # (nh, Tq, Tk)

    def score_mod(self, layer):
        # One function per parameter and device (a new function would recompile FlexAttention); it reads the
        # parameters themselves, so gradients reach them.
        if getattr(self._score_mod, "raw", None) is not self.raw_r1 or self._score_mod.device != self.raw_r1.device:
            scheme = self

            def kerple(score, b, h, q_idx, kv_idx):
                r1, r2 = scheme.coefficients()
                return score + scheme.kernel_bias((q_idx - kv_idx).clamp(min=0).float(), r1[h], r2[h])

            kerple.raw, kerple.device = self.raw_r1, self.raw_r1.device
            self._score_mod = kerple
        return self._score_mod


class FIRE(PositionScheme):
    """FIRE (Li et al. 2023, "Functional Interpolation for Relative Positions Improves Long Context Transformers"):
    the logit bias of query i for key j <= i is f(psi(i - j) / psi(max(L, i))), psi(x) = log(c * x + 1), with f a small
    MLP (1 -> hidden, ReLU, -> one output per head) and c, L > 0 learned. Dividing by psi(max(L, i)) is the paper's
    progressive interpolation: past the threshold L every query sees its distances mapped into [0, 1], the range it
    was trained on. Positions count from 0.

    Each layer has its own f, c and L (the paper's FIRE); {"shared": true} gives one for all layers (its layerwise
    sharing). c and L are kept positive by softplus, as Kerple's coefficients; L starts at the training length
    (`threshold` to choose), c at 1. f's Linears start as every Linear of the model (N(0, 0.02), zero biases), so at
    init the bias is near zero. It is computed in fp32, outside autocast, whatever the model's dtype.

    The bias depends on i as well as on i - j, so the CPU blocks build it explicitly per block of queries, and with
    gradients each block's bias is recomputed in backward (posenc/attention.py: checkpointed_blocks); memory stays
    linear in T. It has no score_mod: on a GPU it takes the same blocks, in fp32.
    """

    options = {"hidden": 32, "shared": False, "threshold": None}  # the paper's MLP width; threshold None: block_size
    no_scaling = ("FIRE needs no scaling: its progressive interpolation already maps every distance of a longer "
                  "sequence into the range it was trained on")
    no_export = "transformers has no architecture with FIRE's learned MLP bias"

    def __init__(self, config):
        super().__init__(config)
        o = self.option_values(config)
        self.shared = o["shared"]
        n = 1 if self.shared else config.n_layer
        hidden = o["hidden"]
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, config.n_head))
                                  for _ in range(n))  # f of each layer, or of all

        threshold = float(o["threshold"] or config.block_size)
        self.raw_c = nn.Parameter(inverse_softplus(torch.ones(n)))  # (layers,)
        self.raw_threshold = nn.Parameter(inverse_softplus(torch.full((n,), threshold)))

    @classmethod
    def check_config(cls, config):
        super().check_config(config)
        o = cls.option_values(config)
        for key, ok, expected in (
                ("hidden", isinstance(o["hidden"], int) and o["hidden"] >= 1, "an integer >= 1"),
                ("shared", isinstance(o["shared"], bool), "true or false"),
                ("threshold", o["threshold"] is None or isinstance(o["threshold"], (int, float)) and o["threshold"] > 0,
                 "a number > 0, or null for the training length")):
            if not ok or (key != "shared" and isinstance(o[key], bool)):
                raise ValueError(f"bad pos_options value {o[key]!r} for {key!r} of fire: expected {expected}")

    def interpolated(self, q_pos, k_pos, layer):
        """psi(i - j) / psi(max(L, i)), (Tq, Tk) in fp32: the MLP's input."""
        m = 0 if self.shared else layer
        c, threshold = F.softplus(self.raw_c[m].float()), F.softplus(self.raw_threshold[m].float())
        distance = (q_pos[:, None] - k_pos[None, :]).clamp(min=0).float()  # future keys are masked
        return torch.log1p(c * distance) / torch.log1p(c * torch.maximum(q_pos.float(), threshold))[:, None]

    def attn_bias(self, q_pos, k_pos, layer):
        with torch.autocast(q_pos.device.type, enabled=False):
            x = self.interpolated(q_pos, k_pos, layer)[..., None]  # (Tq, Tk, 1)
            first, _, last = self.mlps[0 if self.shared else layer]
            hidden = F.relu(F.linear(x, first.weight.float(), first.bias.float()))  # (Tq, Tk, hidden)
            return F.linear(hidden, last.weight.float(), last.bias.float()).permute(2, 0, 1)  # (nh, Tq, Tk)


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
        if self.self_extend is not None:  # keys are cached as they are: Self-Extend rotates them twice in attend
            return q, k
        cos, sin = self.cos[pos], self.sin[pos]  # (T, rot_dim / 2), or (B, T, rot_dim / 2) for per-sequence ids
        if pos.dim() == 2:
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, rot_dim / 2): the same for every head
        return apply_rope(q, cos, sin, self.layout), apply_rope(k, cos, sin, self.layout)

    self_extend = None  # (window, group) once set_self_extend is called: an inference option, not a trained one
    no_self_extend = None  # why Self-Extend cannot run on this rotary scheme; None: it can

    def attend(self, q, k, v, q_pos, k_pos, layer, gates=None, probe=None):
        if self.self_extend is None:
            return None
        window, group = self.self_extend
        far = self.grouped(q_pos[-1:], window, group)  # the largest grouped id needs a table that long
        self.prepare(max(int(k_pos[-1]) + 1, int(far) + 1), q.device)
        return self_extend_attention(q, k, v, q_pos, k_pos, self.cos, self.sin, self.layout, window, group)

    @staticmethod
    def grouped(q_pos, window, group):
        """A query's grouped position: floor(p / G) shifted by W - W // G, so grouped distances continue from W."""
        return q_pos // group + window - window // group




def check_self_extend(window, group):
    """One clear line for a bad Self-Extend setting: the window W and the group size G are integers >= 1."""
    for name, value in (("window", window), ("group", group)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"bad Self-Extend {name} {value!r}: give --self_extend=W,G with integers W >= 1 "
                             "(the neighbor window) and G >= 1 (the group size), e.g. --self_extend=64,4")


def check_self_extend_flag(values):
    """The --self_extend=W,G flag of evaluate.py and sample.py: empty (off) or two integers >= 1."""
    if values and len(values) != 2:
        raise ValueError(f"bad value {','.join(map(str, values))!r} for config key 'self_extend': give two numbers "
                         "W,G (the neighbor window and the group size), e.g. --self_extend=64,4")
    if values:
        check_self_extend(*values)


def set_self_extend(model, window, group):
    """Self-Extend (Jin et al. 2024, "LLM Maybe LongLM") on a RoPE model, training-free: keys within `window`
    of the query keep their exact relative positions, farther keys use grouped positions floor(p / group).
    ValueError (one line) for a bad setting or a model it cannot run on."""
    check_self_extend(window, group)
    scheme = model.transformer.pos
    if not isinstance(scheme, RoPE):
        raise ValueError(f"Self-Extend regroups RoPE positions; this model has {model.config.pos_encoding!r} positions")
    if scheme.no_self_extend:
        raise ValueError(f"Self-Extend cannot run on this {model.config.pos_encoding} model: {scheme.no_self_extend}")
    if length_dependent(scheme.scaling):
        raise ValueError(f"Self-Extend keeps the model's frequencies, but {scheme.scaling['rope_type']!r} changes them "
                         "with the length: use a fixed scaling or none")
    scheme.self_extend = (window, group)
    return model


def self_extend_attention(q, k, v, q_pos, k_pos, cos, sin, layout, window, group, chunk=None):
    """Causal attention of unrotated q (B, nh, Tq, hs) over unrotated k, v (B, nh, Tk, hs): scores from exact
    positions where the distance is < window, from grouped positions elsewhere, in one softmax.

    On a CPU (consecutive positions, no `chunk`), each of the two parts through the flash kernel and merged by
    their log-sum-exps (attention_by_distance), in q's dtype: at 32k the explicit scores below took minutes.
    Elsewhere, or with `chunk` (queries per block), the scores are formed explicitly in fp32, two q·k products
    per block."""
    if chunk is None and q.device.type == "cpu" and consecutive(q_pos) and consecutive(k_pos):
        def rotated(x, pos):
            return apply_rope(x, cos[pos], sin[pos], layout).to(x.dtype)
        near = (rotated(q, q_pos), rotated(k, k_pos), 0, window)
        far = (rotated(q, RoPE.grouped(q_pos, window, group)), rotated(k, k_pos // group), window, None)
        return attention_by_distance([near, far], v, q_pos, k_pos)

    def rot(x, pos):
        return apply_rope(x, cos[pos], sin[pos], layout).float()

    k_near, k_far = rot(k, k_pos), rot(k, k_pos // group)
    vf, scale, out = v.float(), 1 / math.sqrt(q.size(-1)), []
    chunk = chunk or block_rows(*q.shape[:3], k.size(-2))  # queries per block: a fixed budget of scores
    for s in range(0, q.size(-2), chunk):
        qp, qc = q_pos[s:s + chunk], q[..., s:s + chunk, :]
        distance = qp[:, None] - k_pos[None, :]  # (Tq, Tk)
        near = rot(qc, qp) @ k_near.transpose(-2, -1)  # (B, nh, Tq, Tk)
        far = rot(qc, RoPE.grouped(qp, window, group)) @ k_far.transpose(-2, -1)
        scores = torch.where(distance < window, near, far) * scale
        probs = scores.masked_fill(distance < 0, -math.inf).softmax(-1)
        out.append(probs @ vf)
    return torch.cat(out, dim=-2).to(v.dtype)


class RoPENoPE(RoPE):
    """RoPE on most layers, no positions on every nope_interval-th: the hybrid of Yang et al. 2025 ("Rope to Nope
    and Back Again", arXiv 2501.18795), SmolLM3's no_rope_layers and Llama 4's iRoPE. NoPE layers are those with
    (layer + 1) % nope_interval == 0 (layers 3, 7, ... for 4, SmolLM3's and Llama 4's rule), or exactly the indices in
    nope_layers. The RoPE layers are plain RoPE, with every rope_scaling method; NoPE layers have nothing to scale.

    attn_scale > 0 turns on Llama 4's query temperature on the NoPE layers (Scalable-Softmax, arXiv 2501.19399):
    q * (1 + attn_scale * log1p(floor((p + 1) / floor_scale))) at position p; Llama 4 uses attn_scale 0.1, floor_scale
    8192. Meta describes it as inference-time temperature scaling for length generalization: the softmax over more
    keys is sharpened as a query sits farther out. floor_scale defaults to the training length L
    (original_max_position_embeddings once extended), so the temperature is 1 on the positions trained on (all but
    the last, p + 1 = L) and grows with the log of the multiple of L past them: 1 + attn_scale * ln(1 + k) at
    p + 1 = kL. Llama 4's 8192 is a fixed length far below its context; our L plays that role at any scale.
    """

    options = {"nope_interval": 4, "nope_layers": None, "attn_scale": 0.0, "floor_scale": None}
    no_export = ("transformers' models with NoPE layers (SmolLM3 and Llama 4: no_rope_layers) are Llama blocks, "
                 "with RMSNorm and a SiLU-gated MLP where we have LayerNorm and a GELU MLP (and Llama 4 adds q/k L2 "
                 "norms and chunked attention on its RoPE layers); GPT-NeoX, our rope export, has no NoPE layers")

    def __init__(self, config):
        super().__init__(config)
        o = self.option_values(config)
        self.nope = self.nope_layers(config)
        self.attn_scale = float(o["attn_scale"])
        self.floor_scale = o["floor_scale"] or original_length(config.rope_scaling, config.block_size)

    @classmethod
    def check_config(cls, config):
        super().check_config(config)
        o = cls.option_values(config)
        number = (int, float)
        for key, ok, expected in (
                ("nope_interval", isinstance(o["nope_interval"], int) and o["nope_interval"] >= 1, "an integer >= 1"),
                ("attn_scale", isinstance(o["attn_scale"], number) and o["attn_scale"] >= 0, "a number >= 0"),
                ("floor_scale", o["floor_scale"] is None or isinstance(o["floor_scale"], int) and o["floor_scale"] >= 1,
                 "an integer >= 1, or null for the training length")):
            if not ok or isinstance(o[key], bool):
                raise ValueError(f"bad pos_options value {o[key]!r} for {key!r} of rope_nope: expected {expected}")
        cls.nope_layers(config)

    @classmethod
    def nope_layers(cls, config):
        """The indices of the NoPE layers, as a frozenset."""
        o, given = cls.option_values(config), config.pos_options or {}
        if o["nope_layers"] is None:
            return frozenset(i for i in range(config.n_layer) if (i + 1) % o["nope_interval"] == 0)
        layers = o["nope_layers"]
        if "nope_interval" in given:
            raise ValueError("give rope_nope either nope_interval or nope_layers in pos_options, not both")
        if (not isinstance(layers, list) or len(set(layers)) != len(layers)
                or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < config.n_layer for i in layers)):
            raise ValueError(f"bad pos_options value {layers!r} for 'nope_layers' of rope_nope: expected a list of "
                             f"distinct layer indices in 0..{config.n_layer - 1}")
        return frozenset(layers)

    def temperature(self, pos):
        """(T,) fp32 factor of the queries at positions pos on a NoPE layer."""
        return 1 + self.attn_scale * torch.log1p(torch.floor((pos.float() + 1) / self.floor_scale))

    def rotate(self, q, k, pos, layer):
        if layer not in self.nope:
            return super().rotate(q, k, pos, layer)
        if self.attn_scale:
            q = (q.float() * self.temperature(pos)[:, None]).type_as(q)  # (B, nh, T, hs) times (T, 1)
        return q, k

    def attend(self, q, k, v, q_pos, k_pos, layer, gates=None, probe=None):
        # Self-Extend regroups rotary positions; a NoPE layer has none, so it attends as it always does.
        return None if layer in self.nope else super().attend(q, k, v, q_pos, k_pos, layer)


class XPos(RoPE):
    """xPos (Sun et al. 2022, "A Length-Extrapolatable Transformer"): RoPE whose pair i of the query at position m is
    also scaled by zeta_i^(m / gamma) and of the key at n by zeta_i^(-n / gamma), zeta_i = (2i + 0.4 d) / (1.4 d) for
    the d rotated dims, gamma = scale_base (512, the paper's). A score q·k then carries zeta_i^((m - n) / gamma): an
    exponential decay with the distance, per frequency, the faster the lower the pair. Causal only, as its authors
    note (a future key would grow instead).

    The scales count from position 0, the paper's formula, so cached keys keep theirs and decoding equals the full
    forward. That bounds the length: the key scale zeta_0^(-n / gamma) must stay inside fp32's range, so max_len is
    where it reaches 2^120 (34k tokens at gamma 512), and a longer input is refused in one line. (x-transformers
    and torchscale count from the middle of each call instead: the same scores, but keys cached under one center
    are wrong under the next.) The rotation is RoPE's, with its layouts and partial rotary; the scales multiply
    cos and sin, formed in float64 as RoPE's angles.
    """

    options = {"scale_base": 512}  # gamma
    rope_types = ()
    no_scaling = ("no RoPE scaling is defined for xPos: its decay zeta^((m - n) / gamma) is part of the model, and the "
                  "rope scalings stretch the rotation alone; it runs past its training length as it is")
    no_export = "transformers has no architecture with xPos's decay on the queries and keys"
    no_self_extend = "it regroups the rotation's positions but not xPos's decay"
    FP32_RANGE = 120 * math.log(2)  # the largest log-scale kept: 2^120, with room below fp32's 2^128 for q and k

    def __init__(self, config):
        super().__init__(config)
        self.scale_base = self.option_values(config)["scale_base"]
        d = self.rot_dim
        self.register_buffer("zeta", (torch.arange(0, d, 2, dtype=torch.float64) + 0.4 * d) / (1.4 * d),
                             persistent=False)  # (d / 2,)

    @classmethod
    def check_config(cls, config):
        super().check_config(config)
        gamma = cls.option_values(config)["scale_base"]
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or gamma <= 0:
            raise ValueError(f"bad pos_options value {gamma!r} for 'scale_base' of xpos: expected a number > 0")

    @property
    def max_len(self):
        return int(self.scale_base * self.FP32_RANGE / -math.log(self.zeta[0].item()))

    def too_long(self, seq_len):
        return (f"sequence of {seq_len} tokens is longer than xPos runs ({self.max_len}): its key scale "
                f"zeta^(-n / {self.scale_base}) leaves fp32's range there; train with a larger scale_base to run "
                "longer")

    def scales(self, pos):
        """zeta^(pos / gamma), (..., T, d / 2) in fp32 from float64 exponents."""
        return torch.exp(pos.to(torch.float64)[..., None] / self.scale_base * self.zeta.log()).float()

    def rotate(self, q, k, pos, layer):
        cos, sin, scale = self.cos[pos], self.sin[pos], self.scales(pos)  # (T, d / 2) or (B, T, d / 2)
        if pos.dim() == 2:
            cos, sin, scale = cos[:, None], sin[:, None], scale[:, None]  # (B, 1, T, d / 2): the same for every head
        q = apply_rope(q, cos * scale, sin * scale, self.layout)
        return q, apply_rope(k, cos / scale, sin / scale, self.layout)


class CoPE(PositionScheme):
    """CoPE (Golovneva et al. 2024, "Contextual Position Encoding: Learning to Count What's Important"), with no other
    position scheme: positions that count what the query selects. Query i gates each key j <= i by g_ij =
    sigmoid(q_i·k_j / √hs), the scaled logit itself, and key j's position is p_ij = g_ij + ... + g_ii, the sum of the
    gates from j to the query; its logit gets q_i·e[p_ij], with e a learned table of npos_max embeddings per layer
    (shared by the heads, as the paper's code) read between the integers floor(p_ij) and ceil(p_ij) by linear
    interpolation, and p_ij clamped to npos_max - 1. The table starts at zero, as the paper's code: at init the
    model is NoPE.

    The positions depend on q and k, so there is no bias to build: every block of queries forms its scores in fp32
    and counts with them (posenc/attention.py: explicit_attention), checkpointed when training; memory stays linear
    in T. Cached decoding is exact: a query's positions need only the keys up to it.
    """

    options = {"npos_max": 64}  # positions 0..npos_max - 1; farther counts share the last one
    no_scaling = ("CoPE needs no scaling: its positions count the tokens its gates select, clamped to npos_max - 1, "
                  "so it runs at any length as it is")
    no_export = "transformers has no architecture with CoPE's contextual positions"
    attends_itself = True

    def __init__(self, config):
        super().__init__(config)
        self.npos_max = self.option_values(config)["npos_max"]
        hs = config.n_embd // config.n_head
        self.tables = nn.ParameterList(torch.zeros(self.npos_max, hs) for _ in range(config.n_layer))  # e per layer

    @classmethod
    def check_config(cls, config):
        super().check_config(config)
        n = cls.option_values(config)["npos_max"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(f"bad pos_options value {n!r} for 'npos_max' of cope: expected an integer >= 2")

    def attend(self, q, k, v, q_pos, k_pos, layer, gates=None, probe=None):
        table, qf = self.tables[layer].float(), q.float()  # (npos_max, hs); q unscaled, as the paper's q·e

        def logits(scores, s, e, n):  # scores (B, nh, rows, n): q·k / √hs, -inf on future keys (gate 0)
            pos = scores.sigmoid().flip(-1).cumsum(-1).flip(-1).clamp(max=self.npos_max - 1)  # p_ij
            at = qf[..., s:e, :] @ table.T  # (B, nh, rows, npos_max): q_i·e[p] at every integer p
            low = pos.floor()
            w = pos - low  # the interpolation weight of ceil(p)
            return (scores + at.gather(-1, low.long()) * (1 - w) + at.gather(-1, pos.ceil().long()) * w)

        return explicit_attention(q, k, v, q_pos, k_pos, logits, probe)


class ForgetGate(PositionScheme):
    """The Forgetting Transformer's forget gate (Lin et al. 2025, "Forgetting Transformer: Softmax Attention with a
    Forget Gate"; FoX), with no other position scheme: each head of each layer computes a gate per token from the
    attention layer's input, f_t = sigmoid(w·x_t + b), and query i's logit for key j <= i gets
    log f_(j+1) + ... + log f_i = c_i - c_j, c the cumulative sum of log f. A decay that the data sets: ALiBi is the
    case of a constant f per head. The gate's Linear starts as every Linear of the model (N(0, 0.02)) with its bias
    at bias_init: 0 by default, the official code's initialization (f about 1/2 at init: strong forgetting to start
    from); x-transformers starts at 5 (f about 0.993, hardly any).

    The log gates are kept per token (in the KV cache too, as the official code keeps them), and c is summed over
    every key at each call, in fp32. Each block of queries forms its scores explicitly and adds c_i - c_j
    (posenc/attention.py: explicit_attention), checkpointed when training: memory stays linear in T.
    """

    options = {"bias_init": 0.0}  # the gates' bias at init: f = sigmoid(bias_init) for every token to start
    no_scaling = ("the forget gate needs no scaling: its bias is a decay learned from the data, the same rule at any "
                  "length")
    no_export = "transformers has no architecture with the Forgetting Transformer's forget gate"
    attends_itself = True

    def __init__(self, config):
        super().__init__(config)
        self.gate = nn.ModuleList(nn.Linear(config.n_embd, config.n_head) for _ in range(config.n_layer))
        self.bias_init = float(self.option_values(config)["bias_init"])

    @classmethod
    def check_config(cls, config):
        super().check_config(config)
        b = cls.option_values(config)["bias_init"]
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b):
            raise ValueError(f"bad pos_options value {b!r} for 'bias_init' of fox: expected a number")

    def init_weights(self):
        for g in self.gate:
            nn.init.constant_(g.bias, self.bias_init)

    def gates(self, x, layer):
        g = self.gate[layer]
        with torch.autocast(x.device.type, enabled=False):
            return F.logsigmoid(F.linear(x.float(), g.weight.float(), g.bias.float())).transpose(1, 2)  # (B, nh, T)

    def attend(self, q, k, v, q_pos, k_pos, layer, gates=None, probe=None):
        c = gates.cumsum(-1)  # (B, nh, Tk): c_j, every key's
        c_q = c[..., c.size(-1) - q.size(-2):]  # the queries are the last Tq tokens

        def logits(scores, s, e, n):
            return scores + (c_q[..., s:e, None] - c[..., None, :n])

        return explicit_attention(q, k, v, q_pos, k_pos, logits, probe)


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


SCHEMES = {"learned": Learned, "sinusoidal": Sinusoidal, "alibi": ALiBi, "rope": RoPE, "none": NoPE,
           "rope_nope": RoPENoPE, "t5": T5Bias, "kerple": Kerple, "fire": FIRE, "xpos": XPos, "cope": CoPE,
           "fox": ForgetGate}
