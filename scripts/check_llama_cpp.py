"""llama.cpp against our model on GGUF exports: logits, greedy tokens, perplexity past L, tokenization, speed.

    python -m scripts.check_llama_cpp --ckpts=out/rope/ckpt.pt,out/rope_linear_x4/ckpt.pt --data_dir=data/stdlib
    (scripts/check_llama_cpp.sh trains and extends the models, builds llama-cpp-python and runs this)

For every checkpoint and dtype (f32, f16, bf16, q8_0) the export is run by llama.cpp (llama-cpp-python, one
batch, f32 KV cache) on one held-out document at L and at 4L tokens (L: the original training length), and
compared with:
  ours        our model as it is;
  ggml-GELU   our model with llama.cpp's GELU (tanh approximation through an fp16 table, export_gguf.ggml_gelu):
              what remains is the mapping itself and f32 summation order.
Passes (exit 0) when, in f32, llama.cpp is within --tol of the gated reference at every length and its greedy
tokens (argmax at every position) equal the reference's, and llama.cpp tokenizes the document as tiktoken does.
The gated reference is `ours` for models trained with activation=gelu_tanh (the GELU llama.cpp computes), and
ggml-GELU for exact-GELU models, which cannot meet the goal against themselves: llama.cpp has no exact GELU.
The f16, bf16 and q8_0 rows are reported, not gated: they measure the rounding (q8_0 runs with --no-repack).
Speed: tokens/s of a 4L-token prefill and of 64 greedy decoding steps after it, ours (generation.generate, the
decode step compiled, in f32 and in bf16 where the CPU computes it natively) against llama.cpp's on the f32 and
bf16 files, with the same thread count, the best of 3 alternating runs; both compute the last position's logits
only, as generation does.
"""
import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from posenc.checkpoint import model_from_checkpoint
from posenc.data import held_out_documents
from posenc.generation import generate, to_inference_dtype
from posenc.rope_scaling import original_length
from posenc.runtime import resolve_dtype
from posenc.tokenizer import get_tokenizer
from scripts import export_gguf

DTYPES = ("f32", "f16", "bf16", "q8_0")  # gated: f32; the others are reported (they measure their rounding)
NO_REPACK = ("q8_0",)  # run with llama.cpp's --no-repack: its AMX repacked Q8_0 kernels crashed on the check's VM
DECODE = 64  # greedy decoding steps in the speed comparison


def label(config):
    s = config.rope_scaling
    if not s:
        return {"rope": "RoPE", "alibi": "ALiBi"}.get(config.pos_encoding, config.pos_encoding)
    return {"linear": "PI", "yarn": "YaRN"}.get(s["rope_type"], s["rope_type"]) + f" x{s['factor']:g}"


def nll(logits, targets):
    """Mean negative log-likelihood (float64) of targets under logits (T, vocab)."""
    x = torch.from_numpy(np.asarray(logits, np.float64))
    return torch.nn.functional.cross_entropy(x, torch.as_tensor(targets)).item()


def references(model, doc, L):
    """{T: (ours, ggml-GELU) logits (T, vocab)} for the document's first L and 4L tokens."""
    out = {}
    for T in (L, 4 * L):
        idx = torch.tensor([doc[:T].tolist()])
        with torch.no_grad():
            ours = model(idx)[0][0].numpy()
            with export_gguf.with_ggml_gelu(model):
                out[T] = ours, model(idx)[0][0].numpy()
    return out


def compare(refs, path, doc, L, threads, repack=True):
    """One row per length (L, 4L): max |Δ logit| against ours and ggml-GELU, greedy agreement, perplexity past L."""
    rows = []
    for T, (ours, ggml) in refs.items():
        theirs = export_gguf.llama_cpp_logits(path, doc[:T].tolist(), n_threads=threads, repack=repack)
        row = {"T": T, "max_d_ours": float(np.abs(theirs - ours).max()),
               "max_d_ggml": float(np.abs(theirs - ggml).max()), "max_logit": float(np.abs(ours).max()),
               "greedy_ours": float((theirs.argmax(-1) == ours.argmax(-1)).mean()),
               "greedy_ggml": float((theirs.argmax(-1) == ggml.argmax(-1)).mean())}
        if T > L:  # the document's tokens past the training length, predicted from everything before them
            targets = doc[L:T]
            row |= {"ppl_ours": float(np.exp(nll(ours[L - 1:T - 1], targets))),
                    "ppl_llama": float(np.exp(nll(theirs[L - 1:T - 1], targets)))}
        rows.append(row)
    return rows


def ours_timing(model, prompt, compile=True):
    """(prefill seconds, decode seconds, tokens) of our model as sample.py runs it (generation.generate): a KV-cache
    prefill, then DECODE greedy steps through the static decode step, compiled when `compile`."""
    stamps = []
    t0 = time.perf_counter()
    out = generate(model, torch.tensor([prompt]), DECODE + 1, temperature=0.0, compile=compile,
                   on_token=lambda tok: stamps.append(time.perf_counter()))  # the first stamp: after the prefill
    return stamps[0] - t0, stamps[-1] - stamps[0], out[0, len(prompt):len(prompt) + DECODE].tolist()


def llama_timing(path, prompt, threads):
    """The same for llama.cpp (its own KV cache, f32 like ours; the last position's logits only, as ours)."""
    llm = export_gguf.open_llama(path, len(prompt) + DECODE, threads, logits_all=False)
    try:
        t0 = time.perf_counter()
        llm.eval(prompt)
        prefill, tokens, t0 = time.perf_counter() - t0, [], time.perf_counter()
        for _ in range(DECODE):
            tokens.append(int(np.argmax(export_gguf.last_logits(llm))))
            llm.eval([tokens[-1]])
        return prefill, time.perf_counter() - t0, tokens
    finally:
        llm.close()


def speed(model, paths, doc, T, threads, repeats=3):
    """Tokens/s of a T-token prefill and of DECODE greedy steps after it, ours and llama.cpp's, each the best of
    `repeats` alternating runs (a shared VM's speed drifts between runs), and whether all decoded the same tokens.
    Ours in fp32 and, where the machine computes bf16 natively, with weights cast to bf16 (generation's rule,
    runtime.resolve_dtype), the decode step compiled; llama.cpp on `paths`: {"f32": its f32 file, "bf16": ...}."""
    prompt = doc[:T].tolist()
    ours = {"f32": model}
    dtype = resolve_dtype("auto", "cpu")[0]
    if dtype != "float32":
        ours["bf16"] = to_inference_dtype(copy.deepcopy(model), dtype)
    for m in ours.values():  # compiled once per model, before the timed runs
        ours_timing(m, prompt)
    runs = [{**{f"ours_{k}": ours_timing(m, prompt) for k, m in ours.items()},
             **{f"llama_{k}": llama_timing(p, prompt, threads) for k, p in paths.items()}} for _ in range(repeats)]
    out = {"T": T, "repeats": repeats, "decode_steps": DECODE}
    for side in runs[0]:
        out[f"{side}_prefill"] = T / min(r[side][0] for r in runs)
        out[f"{side}_decode"] = DECODE / min(r[side][1] for r in runs)
    out["same_decoded_tokens"] = {side: all(r[side][2] == r["llama_f32"][2] for r in runs) for side in runs[0]}
    return out


def tokenization_matches(path, text):
    import llama_cpp
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode(), add_bos=False, special=False) == get_tokenizer().encode_ordinary(text)
    finally:
        llm.close()


def version():
    import llama_cpp
    info = llama_cpp.llama_print_system_info().decode().strip()
    return f"llama-cpp-python {llama_cpp.__version__} ({info})"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpts", required=True, help="comma-separated checkpoints (a RoPE model and its extensions, "
                   "and any other model llama.cpp runs; the first one's f32 file is timed)")
    p.add_argument("--data_dir", required=True, help="the prepared data (full GPT-2 vocabulary) they were trained on")
    p.add_argument("--out_dir", default="out/check_llama_cpp/report")
    p.add_argument("--tol", type=float, default=1e-3, help="max |Δ logit| allowed in f32 (against ours for "
                   "gelu_tanh models, against ggml-GELU for exact-GELU ones)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--build_seconds", default="", help="how long llama-cpp-python took to build (for the report)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results, ok, L, gates = [], True, None, set()
    for ckpt in args.ckpts.split(","):
        model, _ = model_from_checkpoint(ckpt)
        gate = "ours" if model.config.activation == "gelu_tanh" else "ggml"  # the reference llama.cpp must meet
        gates.add(gate)
        L = original_length(model.config.rope_scaling, model.config.block_size)
        # the same document for both implementations: a comparison, not a score, so a train one serves as well
        doc = held_out_documents(args.data_dir, 4 * L + DECODE, 1, train_docs=True)[0][0].astype(np.int64)
        refs = references(model, doc, L)
        for dtype in DTYPES:
            path = export_gguf.export(ckpt, out / f"{Path(ckpt).parent.name}_{dtype}.gguf", dtype, overwrite=True)
            for row in compare(refs, path, doc, L, args.threads, repack=dtype not in NO_REPACK):
                row |= {"model": label(model.config), "activation": model.config.activation, "dtype": dtype,
                        "gate": gate}
                results.append(row)
                if dtype == "f32":
                    ok &= row[f"max_d_{gate}"] <= args.tol and row[f"greedy_{gate}"] == 1.0
                print(json.dumps(row), flush=True)
    first = out / f"{Path(args.ckpts.split(',')[0]).parent.name}_f32.gguf"
    model, _ = model_from_checkpoint(args.ckpts.split(",")[0])
    text = get_tokenizer().decode(doc[:4 * L].tolist()) + " héllo 🙂 \t\n 1234567 it's"
    tokens_ok = tokenization_matches(first, text)
    ok &= tokens_ok
    fast = speed(model, {d: first.with_name(first.name.replace("_f32", f"_{d}")) for d in ("f32", "bf16")}, doc,
                 4 * L, args.threads)
    reference = {"ours": "our model as it is", "ggml": "our model with llama.cpp's GELU (ggml-GELU)"}
    lines = [f"# llama.cpp parity ({version()})", "",
             f"{platform.processor() or platform.machine()}, {args.threads} threads; "
             f"python {platform.python_version()}, "
             f"torch {torch.__version__}" + (f"; llama-cpp-python built in {args.build_seconds} s" if args.build_seconds
                                             else ""), "",
             f"One held-out document of {args.data_dir}; L = {L}. max |Δ| against our model as it is (ours) and "
             "against our model with llama.cpp's GELU, the tanh approximation through an fp16 table (ggml-GELU); "
             "greedy: the fraction of positions whose argmax agrees. Gated (f32): ours for gelu_tanh models, "
             "ggml-GELU for exact-GELU ones (llama.cpp has no exact GELU).", "",
             "| model | GELU | dtype | T | max |Δ| ours | max |Δ| ggml-GELU | max |logit| | greedy ours "
             "| greedy ggml-GELU | ppl past L ours | ppl past L llama.cpp |", "|---" * 11 + "|"]
    for r in results:
        ppl = (f"{r['ppl_ours']:.4f} | {r['ppl_llama']:.4f}" if "ppl_ours" in r else " | ")
        lines.append(f"| {r['model']} | {r['activation']} | {r['dtype']} | {r['T']} | {r['max_d_ours']:.2e} | "
                     f"{r['max_d_ggml']:.2e} | {r['max_logit']:.1f} | {r['greedy_ours']:.4f} | "
                     f"{r['greedy_ggml']:.4f} | {ppl} |")
    f32 = [r for r in results if r["dtype"] == "f32"]
    exact = all(r["max_d_ours"] <= args.tol and r["greedy_ours"] == 1.0 for r in f32)
    lines += ["", f"The issue's goal against our model as it is, f32: max |Δ| <= {args.tol:g} and the same greedy "
              f"tokens at every position: {'met' if exact else 'not met'} (largest "
              f"{max(r['max_d_ours'] for r in f32):.2e})"]
    sides = [k[:-len("_decode")] for k in fast if k.endswith("_decode")]
    lines += ["", f"llama.cpp tokenizes the document (and a unicode tail) as tiktoken does: {tokens_ok}", "",
              f"Speed of {first.name.replace('_f32.gguf', '')}, tokens/s: the best of {fast['repeats']}, KV cache on "
              f"both sides, {args.threads} threads, a prefill of {fast['T']} tokens and {DECODE} greedy steps after "
              "it; ours through generation.generate with its decode step compiled; same tokens: the greedy tokens "
              "equal llama.cpp f32's in every run.", "",
              "| | " + " | ".join(s.replace("_", " ") for s in sides) + " |", "|---" * (len(sides) + 1) + "|",
              "| prefill | " + " | ".join(f"{fast[s + '_prefill']:.0f}" for s in sides) + " |",
              "| decode | " + " | ".join(f"{fast[s + '_decode']:.0f}" for s in sides) + " |",
              "| same tokens | " + " | ".join(str(fast["same_decoded_tokens"][s]) for s in sides) + " |", "",
              f"Decode, ours in f32 against llama.cpp in f32: {fast['ours_f32_decode'] / fast['llama_f32_decode']:.2f}x"
              + (f"; ours in bf16 against llama.cpp in bf16: {fast['ours_bf16_decode'] / fast['llama_bf16_decode']:.2f}x"
                 if "ours_bf16_decode" in fast else ""), "",
              f"passed: {ok} (f32 within {args.tol:g} of {' / '.join(reference[g] for g in sorted(gates))}, the "
              "same greedy tokens at every position, tokenization)"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    summary = {"rows": results, "speed": fast, "tokenization": tokens_ok, "version": version(),
               "goal_vs_exact": exact, "passed": ok}
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
