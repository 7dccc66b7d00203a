"""Forward+backward throughput and peak memory of each position scheme at one context length.

    python bench_model.py                                   # CPU: a small model, T=256
    python bench_model.py --T=4096 --batch_size=8 --n_layer=6 --n_head=6 --n_embd=384 --compile  # GPU
    python bench_model.py --T=32768 --batch_size=1 --n_layer=12 --n_head=12 --n_embd=768 --schemes=rope \
        --activation_checkpointing=true      # long-context fine-tuning memory, GPT-2-124M shape

Measures; asserts nothing. Prints a table and, with --out=path.json, writes it.
"""

import dataclasses
import json
import sys
import time

import torch

from model import GPT, GPTConfig
from positions import SCHEMES


def bench(scheme, T, batch_size, steps, device, dtype, compile, **shape):
    config = GPTConfig(block_size=T, pos_encoding=scheme, **shape)
    model = GPT(config).to(device)
    opt = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), device.type)
    step_model = torch.compile(model) if compile else model
    idx = torch.randint(0, config.vocab_size, (batch_size, T + 1), device=device)
    x, y = idx[:, :-1], idx[:, 1:]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step():
        with autocast:
            _, loss = step_model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):  # warmup (and compilation)
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    dt = (time.perf_counter() - t0) / steps
    tokens_per_sec = batch_size * T / dt
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    mfu = model.estimate_mfu(tokens_per_sec, T, 989e12) if device.type == "cuda" else float("nan")
    return dict(scheme=scheme, T=T, batch_size=batch_size, ms_per_step=1000 * dt,
                tokens_per_sec=tokens_per_sec, peak_mem_gib=peak, mfu_h100=mfu, params=model.num_params())


def main(argv):
    args = dict(a[2:].split("=", 1) if "=" in a else (a[2:], "true") for a in argv)
    device = torch.device(args.pop("device", "cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    T, batch_size = int(args.pop("T", 4096 if cuda else 256)), int(args.pop("batch_size", 8 if cuda else 4))
    steps = int(args.pop("steps", 20 if cuda else 3))
    compile = args.pop("compile", "false") == "true"
    dtype = torch.bfloat16 if cuda else torch.float32
    schemes = args.pop("schemes", ",".join(SCHEMES)).split(",")
    out = args.pop("out", None)
    shape = dict(n_layer=4, n_head=4, n_embd=128) if not cuda else dict(n_layer=6, n_head=6, n_embd=384)
    types = {f.name: f.type for f in dataclasses.fields(GPTConfig)  # --T and --schemes set the other two
             if f.type in (int, float, bool, str) and f.name not in ("block_size", "pos_encoding")}
    for k, v in args.items():  # model fields: n_layer=12, activation_checkpointing=true, rope_theta=5e5, ...
        if k not in types or (types[k] is bool and v not in ("true", "false")):
            sys.exit(f"error: bad option --{k}={v}; use --T, --batch_size, --steps, --schemes, --compile, --out "
                     f"or one of {', '.join(types)} (booleans: true or false)")
        shape[k] = v == "true" if types[k] is bool else types[k](v)
    print(f"device={device} T={T} batch={batch_size} dtype={dtype} compile={compile} {shape}")
    print(f"{'scheme':<11} {'ms/step':>9} {'tokens/s':>10} {'MFU':>6} {'peak GiB':>9}")
    rows = []
    for scheme in schemes:
        r = bench(scheme, T, batch_size, steps, device, dtype, compile, **shape)
        rows.append(r)
        print(f"{scheme:<11} {r['ms_per_step']:9.1f} {r['tokens_per_sec']:10.0f} {r['mfu_h100']:6.1%} "
              f"{r['peak_mem_gib']:9.2f}", flush=True)
    if out:
        with open(out, "w") as f:
            json.dump(dict(device=str(device), gpu=torch.cuda.get_device_name() if cuda else None,
                           torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
