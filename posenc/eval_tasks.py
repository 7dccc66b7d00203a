"""The five long-context evaluation tasks, each a function of (model, EvalData), in the registry TASKS.

  position  loss by token position up to max_len, in log-spaced buckets with a boundary at the training
            length, on documents at least max_len long. Learned positions stop at their table ("cannot run"),
            sinusoidal and RoPE rise past it, ALiBi stays flat, a rescued RoPE stays low.
  ppl       perplexity at L, 2L, 4L, 8L in one of PPL_MODES: sliding windows (the default; PI, YaRN) or
            non-overlapping ones (Press et al. 2021's tables). Either way every token is scored once.
  short     loss on windows of the base length: what extension costs at short context.
  passkey   passkey retrieval (Mohtashami & Jaggi 2023, Landmark Attention; used by PI and YaRN): the
            standard prompt, greedy decoding, accuracy by context length and depth of the key.
  recall    a random span of tokens inside ordinary text, repeated d tokens later: loss and greedy accuracy
            on the second copy by distance d. Shows whether positions past the wall are used at all.

A length a model cannot run (learned positions past their table) is recorded as {"cannot_run": reason},
never a crash. evaluate.py loads the models and data, runs the tasks and writes the report.
"""

import math
import random
import re
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from posenc.rope_scaling import original_length

PASSKEY_NEW_TOKENS = 8  # greedy tokens generated after a passkey prompt; the answer is the first integer in them
_last_log = [0.0]


def log(msg, every=0.0):
    """A progress line on stderr; with `every`, at most one per that many seconds."""
    if time.time() - _last_log[0] >= every:
        _last_log[0] = time.time()
        print(f"[eval {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def device_of(model):
    return model.lm_head.weight.device


def runnable_len(model, want):
    """(longest length <= want the model can run, None or the reason it cannot run want), from the scheme."""
    limit = model.transformer.pos.max_len
    if limit is None or want <= limit:
        return want, None
    return limit, f"{model.config.pos_encoding} positions stop at {limit} (the model refuses longer sequences)"


def training_length(model):
    """The length the weights were first trained at: original_max_position_embeddings when RoPE-scaled."""
    return original_length(model.config.rope_scaling, model.config.block_size)


def default_stride(window):
    """Sliding-window stride: 256 as in the papers, at most half the window."""
    return min(256, max(1, window // 2))


# The ppl task's modes -> what a table says about them. Sliding scores each token with >= W - S tokens of context
# (PI, YaRN, LongRoPE evaluate so); non-overlapping cuts each document into windows of W, so a token sees 0 to W - 1
# tokens of context (Press et al. 2021's tables; a higher perplexity at the same W). Compare with a paper in its mode.
PPL_MODES = {  # mode -> (the title of its tables, how its windows are scored)
    "sliding": ("Sliding-window perplexity", "windows of W tokens slid by S (by default min(256, W/2)), only the "
                "last S targets of each window scored"),
    "nonoverlapping": ("Non-overlapping-window perplexity", "windows of W tokens that do not overlap (stride S = W), "
                       "every target of each window scored, as in Press et al.'s tables"),
}


def ppl_mode(stride, window):
    """The mode a stride gives at a window: a stride of the whole window leaves no overlap."""
    return "nonoverlapping" if stride >= window else "sliding"


@torch.no_grad()
def token_losses(model, x, y):
    """Per-token loss (B, T) in fp32 of targets y (-1: ignored, loss 0) given inputs x, on the CPU."""
    device = device_of(model)
    _, loss = model(torch.as_tensor(x).to(device), torch.as_tensor(y).to(device), reduction="none")
    return loss.float().cpu()


# ----------------------------------------------------------------------------- 1. loss by position

def position_buckets(max_len, base_len, per_octave=2, first=4):
    """Log-spaced [lo, hi) buckets covering input positions [0, max_len) without gaps, edges at
    base_len * 2^(k/per_octave), so one edge is exactly base_len (the wall shows). Position p is the
    prediction made from p + 1 tokens of context. Buckets start at `first` (all below it form bucket 0)."""
    edges = {0, max_len} | ({base_len} if 0 < base_len < max_len else set())
    k_min = math.floor(per_octave * math.log2(first / base_len))
    k_max = math.ceil(per_octave * math.log2(max_len / base_len))
    for k in range(k_min, k_max + 1):
        e = round(base_len * 2 ** (k / per_octave))
        if first <= e < max_len and max_len / e >= 2 ** (0.5 / per_octave):
            edges.add(e)  # (a sliver of a last bucket merges into the one before it)
    edges = sorted(edges)
    return list(zip(edges[:-1], edges[1:]))


CURVE_BINS_PER_L = 4  # the figure's loss curve: 4 bins per training length (64 positions at L = 256)


def loss_by_position(model, docs, max_len, buckets, batch_size=1, curve_bin=None):
    """Mean loss per bucket of positions on the first max_len + 1 tokens of each document (all must be
    that long). Per bucket: mean over documents and positions, std across documents of each document's
    bucket mean, and the tokens it rests on. Buckets a model cannot reach are {"cannot_run": reason}.
    With curve_bin, also "curve": the mean loss in bins of curve_bin positions up to the longest the model
    runs, for a figure with a linear position axis."""
    docs = [np.asarray(d[:max_len + 1]) for d in docs]
    if any(len(d) < max_len + 1 for d in docs):
        raise ValueError(f"loss_by_position needs documents of at least max_len + 1 = {max_len + 1} tokens")
    T, reason = runnable_len(model, max_len)
    per_doc = torch.zeros(len(docs), T)  # (n_docs, T) loss of each document at each position
    for i in range(0, len(docs), batch_size):
        w = torch.from_numpy(np.stack(docs[i:i + batch_size])[:, :T + 1].astype(np.int64))
        per_doc[i:i + len(w)] = token_losses(model, w[:, :-1], w[:, 1:])
        log(f"  position: {i + len(w)}/{len(docs)} documents of {T} tokens", every=10)
    rows = []
    for lo, hi in buckets:
        if hi > T:
            rows.append({"lo": lo, "hi": hi, "cannot_run": reason})
            continue
        m = per_doc[:, lo:hi].mean(1)  # each document's mean loss in this bucket
        std = m.std().item() if len(m) > 1 else 0.0
        rows.append({"lo": lo, "hi": hi, "mean": m.mean().item(), "std": std, "n_tokens": len(docs) * (hi - lo),
                     "doc_means": m.tolist()})
    out = {"buckets": rows, "max_len": max_len, "evaluated_len": T, "cannot_run": reason,
           "n_docs": len(docs), "n_tokens": len(docs) * T}
    if curve_bin:
        out["curve"] = [{"lo": lo, "hi": min(lo + curve_bin, T), "mean": per_doc[:, lo:lo + curve_bin].mean().item()}
                        for lo in range(0, T, curve_bin)]
    return out


def relative_loss(position, reference):
    """Loss by position minus a reference model's at the same positions of the same documents: per bucket, the
    mean and the std across documents of each document's difference of bucket means. Loss falls with position
    for every model (later tokens of a file are easier); relative to a model that uses every position right,
    that fall cancels, and a model that stops using positions past L rises at L."""
    rows = []
    for b, r in zip(position["buckets"], reference["buckets"]):
        if "cannot_run" in b or "cannot_run" in r:
            rows.append({"lo": b["lo"], "hi": b["hi"], "cannot_run": b.get("cannot_run") or r["cannot_run"]})
            continue
        diff = torch.tensor(b["doc_means"], dtype=torch.float64) - torch.tensor(r["doc_means"], dtype=torch.float64)
        rows.append({"lo": b["lo"], "hi": b["hi"], "mean": diff.mean().item(),
                     "std": diff.std().item() if len(diff) > 1 else 0.0})
    return rows


# ----------------------------------------------------------------------------- 2. sliding windows, 3. short

def sliding_windows(n_tokens, window, stride):
    """(begin, end, n_new) per window over n_tokens tokens: inputs [begin, end) predict tokens
    [begin + 1, end + 1), of which only the last n_new are scored, so each of the n_tokens - 1 targets once."""
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window={window}], got {stride}")
    out, done, begin = [], 0, 0  # done: predictions made so far
    while done < n_tokens - 1:
        end = min(begin + window, n_tokens - 1)
        out.append((begin, end, end - done))
        done, begin = end, begin + stride
    return out


def sliding_window_ppl(model, docs, window, stride=None, batch_size=1):
    """Perplexity of windows of `window` tokens slid by `stride` (default min(256, window // 2)) over each
    document (Press et al.), every target scored once. Returns ppl, loss, and the token count it rests on."""
    docs = [docs] if isinstance(docs, np.ndarray) and docs.ndim == 1 else docs
    stride = stride or default_stride(window)
    out = {"window": window, "stride": stride, "mode": ppl_mode(stride, window)}
    n, reason = runnable_len(model, window)
    if reason:
        return out | {"cannot_run": reason}
    total, count, n_windows = 0.0, 0, 0
    for d, doc in enumerate(docs):
        wins = sliding_windows(len(doc), window, stride)
        for i in range(0, len(wins), batch_size):
            group = wins[i:i + batch_size]
            T = max(e - b for b, e, _ in group)
            x = torch.zeros(len(group), T, dtype=torch.long)
            y = torch.full((len(group), T), -1, dtype=torch.long)  # padding and context: not scored
            for r, (b, e, new) in enumerate(group):
                x[r, :e - b] = torch.from_numpy(np.asarray(doc[b:e], dtype=np.int64))
                y[r, e - b - new:e - b] = torch.from_numpy(np.asarray(doc[e - new + 1:e + 1], dtype=np.int64))
            total += token_losses(model, x, y).sum().item()
            count += sum(new for _, _, new in group)
        n_windows += len(wins)
        log(f"  ppl@{window}: {d + 1}/{len(docs)} documents", every=10)
    loss = total / max(count, 1)
    return out | {"loss": loss, "ppl": math.exp(loss), "n_tokens": count, "n_windows": n_windows, "n_docs": len(docs)}


def short_context_loss(model, tokens, base_len, n_windows=64, batch_size=8):
    """Mean loss on n_windows windows of base_len tokens spread evenly over a token stream (the val split):
    the short-context quality that context extension should not lose."""
    if len(tokens) < base_len + 1:
        raise ValueError(f"short-context loss needs more than base_len = {base_len} tokens, got {len(tokens)}")
    starts = np.linspace(0, len(tokens) - base_len - 1, n_windows).astype(np.int64)
    total = 0.0
    for i in range(0, len(starts), batch_size):
        w = torch.from_numpy(np.stack([tokens[s:s + base_len + 1] for s in starts[i:i + batch_size]]).astype(np.int64))
        total += token_losses(model, w[:, :-1], w[:, 1:]).sum().item()
    loss = total / (len(starts) * base_len)
    return {"base_len": base_len, "loss": loss, "ppl": math.exp(loss), "n_tokens": len(starts) * base_len}


# ----------------------------------------------------------------------------- 4. passkey retrieval

PASSKEY_TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                "I will quiz you about the important information there.")
PASSKEY_FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                  "There and back again.")
PASSKEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"


def passkey_prompt(tokenizer, n_tokens, depth, key):
    """Token ids of the Landmark Attention passkey prompt, at most n_tokens long: the task line, filler, the
    key line after a fraction `depth` (0..1) of the filler, more filler, the question; lines joined by
    newlines as in the reference. Filler is whole sentences, so the prompt is short of n_tokens by less than one."""
    enc = tokenizer.encode
    nl = enc("\n")
    head, question = enc(PASSKEY_TASK) + nl, nl + enc(PASSKEY_QUESTION)
    key_line = nl + enc(PASSKEY_LINE.format(key=key)) + nl
    budget = n_tokens - len(head) - len(key_line) - len(question)
    if budget < 0:
        raise ValueError(f"a passkey prompt needs at least {n_tokens - budget} tokens, asked for {n_tokens}")
    first, rest = enc(PASSKEY_FILLER[0]), [enc(" " + s) for s in PASSKEY_FILLER]  # sentences joined by spaces
    sentence = lambda i: first if i == 0 else rest[i % len(rest)]  # noqa: E731
    cum = np.cumsum([0] + [len(sentence(i)) for i in range(budget)])  # cum[k]: tokens of k filler sentences

    def split(m):  # m sentences in all: round(depth * m) before the key, the rest after
        return round(depth * m), m - round(depth * m)

    m = 0
    while m < budget and sum(cum[k] for k in split(m + 1)) <= budget:
        m += 1
    before, after = ([t for i in range(k) for t in sentence(i)] for k in split(m))
    return head + before + key_line + after + question


def parse_passkey(text):
    """The first integer in a continuation, or None."""
    m = re.search(r"\d+", text)
    return int(m.group()) if m else None


def passkey_trial(model, tokenizer, prompt_len, depth, key, max_new_tokens=PASSKEY_NEW_TOKENS, prompt=None,
                  static=True):
    """One prompt (made here unless given): True if the first integer of the greedy continuation (generate, with
    its static decode step unless static=False) is the key."""
    from posenc.generation import generate
    prompt = prompt or passkey_prompt(tokenizer, prompt_len, depth, key)
    idx = torch.tensor([prompt], device=device_of(model))
    out = generate(model, idx, max_new_tokens, temperature=0, static=static)[0, idx.size(1):].tolist()
    return parse_passkey(tokenizer.decode([i for i in out if i < tokenizer.n_vocab])) == key


def passkey_accuracy(model, tokenizer, lengths, depths=(0.0, 0.25, 0.5, 0.75, 1.0), trials=5, seed=0,
                     max_new_tokens=PASSKEY_NEW_TOKENS, static=True):
    """Passkey accuracy by total length (prompt + max_new_tokens) and depth of the key. Keys (1..50000)
    depend only on (seed, length, depth, trial), so every model sees the same prompts. A length too short for
    the prompt itself is recorded as cannot_run; an error of the model propagates."""
    limit, reason = runnable_len(model, max(lengths))
    rows = []
    for n in lengths:
        if n > limit:
            rows.append({"length": n, "cannot_run": reason})
            continue
        keys = {d: [random.Random(f"{seed}-{n}-{d}-{t}").randint(1, 50000) for t in range(trials)] for d in depths}
        try:  # only the prompts: a model's own error must stop the evaluation, not read as "cannot run"
            prompts = {d: [passkey_prompt(tokenizer, n - max_new_tokens, d, k) for k in keys[d]] for d in depths}
        except ValueError as e:  # a length too short for the prompt itself
            rows.append({"length": n, "cannot_run": f"{str(e).split(',')[0]} + {max_new_tokens} generated"})
            continue
        by_depth = [{"depth": d, "accuracy": sum(passkey_trial(model, tokenizer, n - max_new_tokens, d, k,
                                                               max_new_tokens, prompt=p, static=static)
                                                 for k, p in zip(keys[d], prompts[d])) / trials} for d in depths]
        acc = sum(r["accuracy"] for r in by_depth) / len(by_depth)
        rows.append({"length": n, "accuracy": acc, "by_depth": by_depth, "n_trials": trials * len(depths)})
        log(f"  passkey@{n}: accuracy {acc:.2f}")
    return {"depths": list(depths), "trials": trials, "max_new_tokens": max_new_tokens, "by_length": rows}


# ----------------------------------------------------------------------------- 5. long-range recall

def recall_probe(tokens_source, span_len, distance, rng, prefix_len=32, kind="random", vocab=None):
    """One probe from real text: a random slice of tokens_source, with a span of span_len tokens written at
    prefix_len and again `distance` tokens later; it ends with the second copy (T = prefix_len + distance +
    span_len). kind "random": tokens drawn uniformly from the distinct tokens of the text (`vocab`, computed
    if not given): predictable only by copying; "text": a slice of other text. Returns idx (T,) long and
    score_mask (T,) bool over the second copy but its first token (which cannot be known to start a copy)."""
    if distance < span_len:
        raise ValueError(f"distance {distance} < span_len {span_len}: the copies would overlap")
    src = np.asarray(tokens_source)
    T = prefix_len + distance + span_len
    if len(src) < T:
        raise ValueError(f"a recall probe of {T} tokens needs more text than the {len(src)} tokens given")
    start = int(rng.integers(0, len(src) - T + 1))
    idx = torch.from_numpy(src[start:start + T].astype(np.int64))
    if kind == "random":
        vocab = np.unique(src) if vocab is None else vocab
        span = vocab[rng.integers(0, len(vocab), span_len)]
    else:
        s = int(rng.integers(0, len(src) - span_len + 1))
        span = src[s:s + span_len]
    span = torch.from_numpy(span.astype(np.int64))
    idx[prefix_len:prefix_len + span_len] = span
    idx[prefix_len + distance:] = span
    score_mask = torch.zeros(T, dtype=torch.bool)
    score_mask[prefix_len + distance + 1:] = True
    return idx, score_mask


@torch.no_grad()
def scored_predictions(model, idx, score_mask):
    """Loss and greedy correctness (B, S) at the scored positions, S = T - first scored position. The
    prefix goes through the KV cache without logits, so only S positions of logits are ever made."""
    device = device_of(model)
    idx, score_mask = idx.to(device), score_mask.to(device)
    f = int(score_mask.any(0).nonzero()[0])  # first scored position (>= 1)
    cache = model.make_kv_cache(idx.size(0), idx.size(1))
    if f > 1:
        model(idx[:, :f - 1], kv_cache=cache, last_only=True)
    logits = model(idx[:, f - 1:-1], kv_cache=cache)[0].float()  # (B, S, V): predicts idx[:, f:]
    targets = idx[:, f:]
    loss = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, S)
    return loss.cpu(), (logits.argmax(-1) == targets).cpu(), score_mask[:, f:].cpu()


def recall_by_distance(model, tokens_source, distances, span_len=16, trials=16, prefix_len=32, seed=0,
                       batch_size=8, kind="random"):
    """Per distance: mean loss and greedy token accuracy on the second copy of a span, the fraction of copies
    reproduced exactly, and the same loss and accuracy on the first copy (same tokens, nothing to copy
    from yet): the gap between the two is what the model gets from looking d tokens back. Probes depend only
    on (seed, distance), so every model sees the same ones."""
    limit, reason = runnable_len(model, prefix_len + max(distances, default=0) + span_len)
    vocab = np.unique(np.asarray(tokens_source)) if kind == "random" else None
    rows = []
    for d in distances:
        T = prefix_len + d + span_len
        if T > limit:
            rows.append({"distance": d, "length": T, "cannot_run": reason})
            continue
        rng = np.random.default_rng([seed, d])
        try:  # only the probes, as passkey's prompts: a model's own error propagates
            probes = [recall_probe(tokens_source, span_len, d, rng, prefix_len, kind, vocab) for _ in range(trials)]
        except ValueError as e:  # text shorter than a probe
            rows.append({"distance": d, "length": T, "cannot_run": str(e)})
            continue
        sums = dict.fromkeys(("loss", "accuracy", "first_copy_loss", "first_copy_accuracy", "n_tokens", "exact"), 0)
        for i in range(0, trials, batch_size):
            idx, mask = (torch.stack(t) for t in zip(*probes[i:i + batch_size]))
            loss, hit, m = scored_predictions(model, idx, mask)
            loss1, hit1, _ = scored_predictions(model, idx[:, :T - d], mask[:, d:])  # the first copy
            for key, v in (("loss", loss[m]), ("accuracy", hit[m]), ("first_copy_loss", loss1[m]),
                           ("first_copy_accuracy", hit1[m]), ("n_tokens", m), ("exact", (hit | ~m).all(1))):
                sums[key] += v.float().sum().item()
        n = sums["n_tokens"]
        rows.append({"distance": d, "length": T, **{k: sums[k] / n for k in sums if k not in ("n_tokens", "exact")},
                     "exact": sums["exact"] / trials, "n_tokens": int(n), "n_probes": trials})
        log(f"  recall@{d}: accuracy {rows[-1]['accuracy']:.2f}", every=10)
    return {"span_len": span_len, "prefix_len": prefix_len, "kind": kind, "by_distance": rows}


# ----------------------------------------------------------------------------- the registry

@dataclass
class EvalData:
    """What the tasks read: the same documents, lengths and probes for every model."""
    docs: list  # held-out documents of max_len + 1 tokens (position, ppl)
    stream: np.ndarray  # the val split (short, recall)
    tokenizer: object  # the data's tokenizer (passkey), or None
    max_len: int
    base_len: int
    lengths: list  # L, 2L, 4L, 8L up to max_len (ppl, passkey)
    distances: list  # recall distances
    prefix_len: int
    span_len: int
    batch_size: int
    passkey_trials: int
    recall_trials: int
    recall_kind: str
    seed: int
    passkey_depths: tuple = (0.0, 0.25, 0.5, 0.75, 1.0)
    stride: int = 0  # sliding-window stride; 0: default_stride(W)
    ppl_mode: str = "sliding"  # a key of PPL_MODES
    short_windows: int = 64


def run_position(model, d):
    return loss_by_position(model, d.docs, d.max_len, position_buckets(d.max_len, d.base_len), d.batch_size,
                            curve_bin=max(1, d.base_len // CURVE_BINS_PER_L))


def run_ppl(model, d):  # about the same tokens per forward at every window
    def stride(w):
        return w if d.ppl_mode == "nonoverlapping" else min(d.stride, w) or None
    return [sliding_window_ppl(model, d.docs, w, stride(w), batch_size=max(1, d.batch_size * d.max_len // w))
            for w in d.lengths]


def run_short(model, d):
    return short_context_loss(model, d.stream, d.base_len, d.short_windows)


def run_passkey(model, d):
    return passkey_accuracy(model, d.tokenizer, d.lengths, d.passkey_depths, d.passkey_trials, d.seed)


def run_recall(model, d):
    return recall_by_distance(model, d.stream, d.distances, d.span_len, d.recall_trials, d.prefix_len, d.seed,
                              kind=d.recall_kind)


TASKS = {"position": run_position, "ppl": run_ppl, "short": run_short, "passkey": run_passkey, "recall": run_recall}
