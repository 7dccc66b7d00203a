"""Long-context evaluation: where each position scheme hits the wall, and whether extension moves it.

For one or more checkpoints, on held-out documents of a prepared corpus (tasks, each a function here):
  position  loss by token position up to max_len, in log-spaced buckets with a boundary at the training
            length, on documents at least max_len long. Learned positions stop at their table ("cannot run"),
            sinusoidal and RoPE rise past it, ALiBi stays flat, a rescued RoPE stays low.
  ppl       sliding-window perplexity at L, 2L, 4L, 8L (Press et al. 2021; PI; YaRN): windows of W tokens with
            stride S; only the last S targets of each window are scored (the first window scores all), so
            every token is scored once, with >= W - S tokens of context.
  short     loss on windows of the base length: what extension costs at short context.
  passkey   passkey retrieval (Mohtashami & Jaggi 2023, Landmark Attention; used by PI and YaRN): the
            standard prompt, greedy decoding, accuracy by context length and depth of the key.
  recall    a random span of tokens inside ordinary text, repeated d tokens later: loss and greedy accuracy
            on the second copy by distance d. Shows whether positions past the wall are used at all.

    python evaluate.py --ckpt=out/rope/ckpt.pt,out/alibi/ckpt.pt --data_dir=data/stdlib --max_len=2048

Writes <out_dir>/results.json (every number), summary.md (tables) and PNG plots (if matplotlib is installed).
"""

import argparse
import contextlib
import json
import math
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

TASKS = ("position", "ppl", "short", "passkey", "recall")
_last_log = [0.0]


def log(msg, every=0.0):
    """A progress line on stderr; with `every`, at most one per that many seconds."""
    if time.time() - _last_log[0] >= every:
        _last_log[0] = time.time()
        print(f"[eval {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def autocast(device):
    """bf16 autocast on CUDA (losses stay fp32: the model computes them in fp32), nothing elsewhere."""
    if torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", torch.bfloat16)
    return contextlib.nullcontext()


def device_of(model):
    return model.lm_head.weight.device


def runnable_len(model, want):
    """(longest length <= want the model can run, None or the reason it cannot run want). Only learned
    positions refuse, past their table of block_size rows; the scheme's prepare() says so without a forward."""
    try:
        model.transformer.pos.prepare(want, device_of(model))
        return want, None
    except ValueError:
        limit = min(want, model.config.block_size)
        return limit, f"{model.config.pos_encoding} positions stop at {limit} (the model raises ValueError past them)"


def training_length(model):
    """The length the weights were first trained at: original_max_position_embeddings when RoPE-scaled."""
    return int((model.config.rope_scaling or {}).get("original_max_position_embeddings") or model.config.block_size)


@torch.no_grad()
def token_losses(model, x, y):
    """Per-token loss (B, T) in fp32 of targets y (-1: ignored, loss 0) given inputs x, on the CPU."""
    device = device_of(model)
    with autocast(device):
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


def loss_by_position(model, docs, max_len, buckets, batch_size=1):
    """Mean loss per bucket of positions on the first max_len + 1 tokens of each document (all must be
    that long). Per bucket: mean over documents and positions, std across documents of each document's
    bucket mean, and the tokens it rests on. Buckets a model cannot reach are {"cannot_run": reason}."""
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
        rows.append({"lo": lo, "hi": hi, "mean": m.mean().item(), "std": std, "n_tokens": len(docs) * (hi - lo)})
    return {"buckets": rows, "max_len": max_len, "evaluated_len": T, "cannot_run": reason,
            "n_docs": len(docs), "n_tokens": len(docs) * T}


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
    stride = stride or min(256, max(1, window // 2))
    out = {"window": window, "stride": stride}
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


def passkey_trial(model, tokenizer, prompt_len, depth, key, max_new_tokens=8):
    """One prompt: True if the first integer of the greedy continuation (sample.generate) is the key."""
    from sample import generate
    idx = torch.tensor([passkey_prompt(tokenizer, prompt_len, depth, key)], device=device_of(model))
    with autocast(idx.device):
        out = generate(model, idx, max_new_tokens, temperature=0)[0, idx.size(1):].tolist()
    return parse_passkey(tokenizer.decode([i for i in out if i < tokenizer.n_vocab])) == key


def passkey_accuracy(model, tokenizer, lengths, depths=(0.0, 0.25, 0.5, 0.75, 1.0), trials=5, seed=0,
                     max_new_tokens=8):
    """Passkey accuracy by total length (prompt + max_new_tokens) and depth of the key. Keys (1..50000)
    depend only on (seed, length, depth, trial), so every model sees the same prompts."""
    limit, reason = runnable_len(model, max(lengths))
    rows = []
    for n in lengths:
        if n > limit:
            rows.append({"length": n, "cannot_run": reason})
            continue
        try:
            by_depth = []
            for d in depths:
                keys = [random.Random(f"{seed}-{n}-{d}-{t}").randint(1, 50000) for t in range(trials)]
                hits = sum(passkey_trial(model, tokenizer, n - max_new_tokens, d, k, max_new_tokens) for k in keys)
                by_depth.append({"depth": d, "accuracy": hits / trials})
        except ValueError as e:  # a length too short for the prompt itself
            rows.append({"length": n, "cannot_run": f"{str(e).split(',')[0]} + {max_new_tokens} generated"})
            continue
        acc = sum(r["accuracy"] for r in by_depth) / len(by_depth)
        rows.append({"length": n, "accuracy": acc, "by_depth": by_depth, "n_trials": trials * len(depths)})
        log(f"  passkey@{n}: accuracy {acc:.2f}")
    return {"depths": list(depths), "trials": trials, "by_length": rows}


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
    with autocast(device):
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
        probes = [recall_probe(tokens_source, span_len, d, rng, prefix_len, kind, vocab) for _ in range(trials)]
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


# ----------------------------------------------------------------------------- all of it

def held_out_documents(data_dir, min_len, n_docs):
    """Up to n_docs documents of >= min_len tokens, spread over val; topped up from train when val has too
    few (and the note says so)."""
    from data.loader import long_documents
    val = long_documents(data_dir, "val", min_len)
    pick = lambda docs, k: [docs[i * len(docs) // k] for i in range(k)] if k else []  # noqa: E731
    docs, note = pick(val, min(n_docs, len(val))), f"{min(n_docs, len(val))} val documents of >= {min_len} tokens"
    if len(docs) < n_docs:
        train = long_documents(data_dir, "train", min_len)
        k = min(n_docs - len(docs), len(train))
        docs += pick(train, k)
        note += f" + {k} TRAIN documents (not held out: val has only {len(val)} that long)"
    if not docs:
        raise ValueError(f"no documents of >= {min_len} tokens in {data_dir}: lower --max_len or prepare a "
                         "corpus with longer documents")
    return docs, note


def load_models(models, labels=None, device="cpu", rope_scaling=None):
    """{label: model} from checkpoint paths (a list) or a dict of label -> GPT, path, or (path, rope_scaling)
    to evaluate a checkpoint with another scaling (e.g. dynamic NTK with no fine-tuning)."""
    if not isinstance(models, dict):
        models = list(models)
        labels = labels or [Path(p).parent.name or Path(p).stem for p in models]
        if len(labels) != len(models) or len(set(labels)) != len(labels):
            raise ValueError(f"need one distinct label per checkpoint, got labels {labels}")
        models = dict(zip(labels, models))
    out = {}
    for label, m in models.items():
        if isinstance(m, (str, Path, tuple)):
            path, scaling = m if isinstance(m, tuple) else (m, rope_scaling)
            if not Path(path).is_file():
                raise FileNotFoundError(f"no checkpoint at {path}")
            from train import model_from_checkpoint
            m, _ = model_from_checkpoint(str(path), device, override_scaling=scaling)
            stat = Path(path).stat()  # what a result was computed from: a changed checkpoint is evaluated anew
            m.checkpoint_id = f"{path} {stat.st_size} {stat.st_mtime_ns} {json.dumps(scaling)}"
        out[label] = m.eval()
    return out


def evaluate(models, data_dir, max_len, out_dir=None, tasks=TASKS, labels=None, base_len=None, device="cpu",
             n_docs=16, batch_size=1, passkey_trials=5, recall_trials=16, span_len=16, seed=0, wandb="off",
             rope_scaling=None, recall_kind="random", resume=False):
    """Run `tasks` for every model (see load_models); write results.json, summary.md and plots to out_dir
    and return the results. batch_size: documents per forward at max_len (shorter windows get more).
    resume: reuse a checkpoint's results from out_dir/results.json when it and every setting are unchanged."""
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown task(s) {sorted(unknown)}; choose from {', '.join(TASKS)}")
    tokenizer = None
    if "passkey" in tasks:  # fail now, not after hours of the other tasks
        from data.loader import load_meta
        from tokenizer import tokenizer_for
        try:
            tokenizer = tokenizer_for(load_meta(data_dir).get("vocab"))  # the data's (and models') vocabulary
        except RuntimeError as e:
            raise ValueError(str(e)) from None
    models = load_models(models, labels, device, rope_scaling)
    base_len = base_len or min(training_length(m) for m in models.values())
    lengths = [base_len * k for k in (1, 2, 4, 8) if base_len * k <= max_len]
    docs, note = held_out_documents(data_dir, max_len + 1, n_docs) if {"position", "ppl"} & set(tasks) else ([], "")
    docs = [d[:max_len + 1] for d in docs]  # every task scores the same tokens
    from data.loader import load_split
    stream = load_split(data_dir, "val")
    prefix = min(32, base_len // 4)
    distances = [n - prefix - span_len for n in (base_len // 4, base_len // 2, *lengths) if n - prefix >= 2 * span_len]
    settings = json.loads(json.dumps(dict(max_len=max_len, base_len=base_len, data_dir=str(data_dir), tasks=tasks,
                                          n_docs=n_docs, passkey_trials=passkey_trials, recall_trials=recall_trials,
                                          span_len=span_len, seed=seed, recall_kind=recall_kind)))
    results = {"max_len": max_len, "base_len": base_len, "data_dir": str(data_dir), "tasks": list(tasks),
               "documents": {"n_docs": len(docs), "doc_len": max_len + 1, "source": note}, "models": {},
               "settings": settings}
    saved = Path(out_dir) / "results.json" if out_dir else None
    earlier = json.loads(saved.read_text()) if resume and saved and saved.exists() else {}
    earlier = earlier.get("models", {}) if earlier.get("settings") == settings else {}
    for label, model in models.items():
        checkpoint_id = getattr(model, "checkpoint_id", None)
        if checkpoint_id and earlier.get(label, {}).get("checkpoint_id") == checkpoint_id:
            results["models"][label] = earlier[label]
            log(f"{label}: evaluated in an earlier run with the same checkpoint and settings, reused")
            continue
        c = model.config
        r = results["models"][label] = {"pos_encoding": c.pos_encoding, "block_size": c.block_size,
                                        "rope_scaling": c.rope_scaling, "training_length": training_length(model),
                                        "params": model.num_params(), "checkpoint_id": checkpoint_id}
        log(f"{label}: {c.pos_encoding}, block_size {c.block_size}, scaling {c.rope_scaling}")
        if "position" in tasks:
            r["position"] = loss_by_position(model, docs, max_len, position_buckets(max_len, base_len), batch_size)
        if "ppl" in tasks:
            r["ppl"] = [sliding_window_ppl(model, docs, w, batch_size=max(1, batch_size * max_len // w))
                        for w in lengths]  # about the same tokens per forward at every window
        if "short" in tasks:
            r["short"] = short_context_loss(model, stream, base_len)
        if "passkey" in tasks:
            r["passkey"] = passkey_accuracy(model, tokenizer, lengths, trials=passkey_trials, seed=seed)
        if "recall" in tasks:
            r["recall"] = recall_by_distance(model, stream, distances, span_len, recall_trials, prefix, seed,
                                             kind=recall_kind)
        if saved:
            write_json(results, saved)  # after each model: partial results survive, and --resume reuses them
    if out_dir:
        write_report(results, out_dir, wandb)
    return results


def write_json(results, path):
    """results as JSON, NaN and inf written as null (valid JSON for every reader)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json.loads(json.dumps(results), parse_constant=lambda c: None), indent=1))


def write_report(results, out_dir, wandb="off"):
    """summary.md and the plots; logged to wandb when asked. Reusable on a loaded results.json."""
    from plots import plot_all, summary_markdown
    out_dir = Path(out_dir)
    write_json(results, out_dir / "results.json")
    md = summary_markdown(results)
    pngs = plot_all(results, out_dir)
    (out_dir / "summary.md").write_text(md + "".join(f"\n![{p.stem}]({p.name})\n" for p in pngs))
    log(f"wrote {out_dir}/results.json, summary.md" + (f" and {len(pngs)} plots" if pngs else
                                                        " (no plots: matplotlib is not installed)"))
    if wandb != "off":
        try:
            import wandb as wb
            run = wb.init(project="posenc", job_type="eval", mode=wandb, dir=str(out_dir), config=results["documents"])
            run.log({"summary": wb.Html(f"<pre>{md}</pre>"), **{p.stem: wb.Image(str(p)) for p in pngs},
                     **scalars(results)})
            run.finish()
        except Exception as e:  # logging must never lose the results already written
            log(f"warning: wandb logging failed ({str(e).splitlines()[0] if str(e) else type(e).__name__})")


def scalars(results):
    """The headline numbers as flat {"label/metric@length": value} (for wandb and quick comparisons)."""
    out = {}
    for k, r in results["models"].items():
        out |= {f"{k}/ppl@{e['window']}": e["ppl"] for e in r.get("ppl", []) if "ppl" in e}
        out |= {f"{k}/short_loss": r["short"]["loss"]} if "short" in r else {}
        out |= {f"{k}/passkey@{e['length']}": e["accuracy"] for e in r.get("passkey", {}).get("by_length", [])
                if "accuracy" in e}
        out |= {f"{k}/recall@{e['distance']}": e["accuracy"] for e in r.get("recall", {}).get("by_distance", [])
                if "accuracy" in e}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="checkpoint paths, comma-separated")
    p.add_argument("--labels", default="", help="one label per checkpoint, comma-separated (default: folder names)")
    p.add_argument("--data_dir", default="data/stdlib")
    p.add_argument("--max_len", type=int, default=2048)
    p.add_argument("--base_len", type=int, default=0, help="0: the shortest training length among the models")
    p.add_argument("--out_dir", default="out/eval")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1")
    p.add_argument("--n_docs", type=int, default=16, help="long documents for the position and ppl tasks")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--passkey_trials", type=int, default=5, help="per length and depth")
    p.add_argument("--recall_trials", type=int, default=16, help="probes per distance")
    p.add_argument("--recall_kind", default="random", choices=("random", "text"),
                   help="span of random tokens of the text (only copying predicts it) or a slice of other text")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rope_scaling", default=None, help="JSON applied to every checkpoint, e.g. "
                   '\'{"rope_type":"dynamic","factor":4,"original_max_position_embeddings":256}\'')
    p.add_argument("--wandb", default="off", choices=("off", "offline", "online"))
    p.add_argument("--resume", action="store_true", help="reuse results of unchanged checkpoints in out_dir")
    a = p.parse_args(argv)
    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        try:
            scaling = json.loads(a.rope_scaling) if a.rope_scaling else None
        except json.JSONDecodeError as e:
            raise ValueError(f"--rope_scaling is not valid JSON ({e})") from None
        results = evaluate(a.ckpt.split(","), a.data_dir, a.max_len, a.out_dir, a.tasks.split(","),
                           a.labels.split(",") if a.labels else None, a.base_len or None, device, a.n_docs,
                           a.batch_size, a.passkey_trials, a.recall_trials, seed=a.seed, wandb=a.wandb,
                           rope_scaling=scaling, recall_kind=a.recall_kind, resume=a.resume)
    except (OSError, ValueError) as e:
        sys.exit(f"evaluate: {e}")
    from plots import summary_markdown
    print(summary_markdown(results))


if __name__ == "__main__":
    main()
