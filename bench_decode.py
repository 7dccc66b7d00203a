"""Decode speed: tokens/s with the KV cache vs recomputing the whole context, at several context lengths.

    python bench_decode.py                                        # ~30M shape, rope, 1k and 4k, CPU or GPU
    python bench_decode.py --contexts=1024,4096,32768 --out=out/bench_decode.json
    python bench_decode.py --pos_encoding=alibi --n_layer=2 --n_embd=128 --n_head=4

Random weights (speed does not depend on them). Both paths run sample.generate greedily from a random
prompt of `context` tokens: the first token costs a prefill, and the tokens after it are what is timed.
"""

import argparse
import dataclasses
import json
import os
import time

import torch

from model import GPT, GPTConfig
from sample import generate, pick_device, pick_dtype, to_inference_dtype


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n_layer", type=int, default=6)
    p.add_argument("--n_head", type=int, default=6)
    p.add_argument("--n_embd", type=int, default=384)
    p.add_argument("--vocab_size", type=int, default=50304)
    p.add_argument("--pos_encoding", default="rope")
    p.add_argument("--rope_scaling", default=None, help="JSON rope_scaling dict")
    p.add_argument("--contexts", default="1024,4096", help="comma-separated prompt lengths")
    p.add_argument("--new_tokens", type=int, default=32, help="tokens generated with the cache")
    p.add_argument("--recompute_tokens", type=int, default=None, help="tokens for the slow path (CPU default 8)")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    return p.parse_args(argv)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_generate(model, prompt, n_new, use_cache, device):
    """-> (seconds to the first token, decode tokens/s after it, peak GPU memory in MB or None)."""
    stamps = []

    def first_token(tok):
        if not stamps:
            sync(device)
            stamps.append(time.perf_counter())

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    generate(model, prompt, n_new, temperature=0.0, use_cache=use_cache, on_token=first_token)
    sync(device)
    decode_s = time.perf_counter() - stamps[0]
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    return stamps[0] - t0, prompt.size(0) * (n_new - 1) / decode_s, peak


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    contexts = [int(c) for c in args.contexts.split(",")]
    n_recompute = args.recompute_tokens or (args.new_tokens if device.startswith("cuda") else 8)
    config = GPTConfig(block_size=max(contexts) + max(args.new_tokens, n_recompute), vocab_size=args.vocab_size,
                       n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, pos_encoding=args.pos_encoding,
                       rope_scaling=json.loads(args.rope_scaling) if args.rope_scaling else None)
    torch.manual_seed(0)
    model = to_inference_dtype(GPT(config).to(device), dtype)
    model.transformer.pos.prepare(config.block_size, device)  # tables at full size: growing them recompiles
    if args.compile:
        model = torch.compile(model, dynamic=True)
    print(f"{model.num_params() / 1e6:.1f}M parameters, {config.pos_encoding}, {device} {str(dtype)[6:]}, "
          f"batch {args.batch_size}{', compiled' if args.compile else ''}")
    print(f"{'context':>8} {'cache tok/s':>12} {'recompute tok/s':>16} {'speedup':>8} {'prefill ms':>11}"
          f" {'peak MB cache':>14} {'peak MB recompute':>18}")
    results = []
    for ctx in contexts:
        prompt = torch.randint(0, config.vocab_size, (args.batch_size, ctx), device=device)
        warm = 2 if device.startswith("cuda") or ctx == contexts[0] else 0  # kernels, allocator, compilation
        for use_cache in (True, False):
            for _ in range(warm):
                generate(model, prompt, 3, temperature=0.0, use_cache=use_cache)
        prefill_s, cached, peak_c = timed_generate(model, prompt, args.new_tokens, True, device)
        _, recompute, peak_r = timed_generate(model, prompt, n_recompute, False, device)
        r = dict(context=ctx, cache_tok_s=cached, recompute_tok_s=recompute, speedup=cached / recompute,
                 prefill_ms=1e3 * prefill_s, peak_mb_cache=peak_c, peak_mb_recompute=peak_r)
        results.append(r)
        mem = f"{peak_c:14.0f} {peak_r:18.0f}" if peak_c is not None else f"{'-':>14} {'-':>18}"
        print(f"{ctx:8d} {cached:12.1f} {recompute:16.2f} {r['speedup']:7.1f}x {r['prefill_ms']:11.1f} {mem}",
              flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        info = dict(device=torch.cuda.get_device_name() if device.startswith("cuda") else device,
                    dtype=str(dtype), torch=torch.__version__, compile=args.compile, batch_size=args.batch_size,
                    new_tokens=args.new_tokens, recompute_tokens=n_recompute, config=dataclasses.asdict(config))
        with open(args.out, "w") as f:
            json.dump(dict(info, results=results), f, indent=2)
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
