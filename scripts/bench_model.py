r"""Forward+backward throughput and peak memory of each position scheme at one context length.

    python -m scripts.bench_model                                   # CPU: the small default model, T=256
    python -m scripts.bench_model --side_by_side --batch_size=8 --vocab_size=4096   # every scheme at the chosen dtype and
                                                            # compile beside fp32 eager `learned` (nanoGPT's step)
    python -m scripts.bench_model --T=4096 --batch_size=8 --n_layer=6 --n_head=6 --n_embd=384 --compile   # GPU
    python -m scripts.bench_model --T=32768 --batch_size=1 --n_layer=12 --n_head=12 --n_embd=768 --schemes=rope \
        --activation_checkpointing=true      # long-context fine-tuning memory, GPT-2-124M shape

Any GPTConfig key is a flag (--rope_theta=5e5, --attn_backend=sdpa, ...). Measures; asserts nothing. Prints a
table and, with --out=path.json, writes it.
"""

import dataclasses
import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from model import GPT, GPTConfig
from posenc.cli import cli
from posenc.config import at_least, check_fields, parse
from posenc.positions import SCHEMES
from posenc.runtime import COMPILE_MIN_STEPS, autocast, resolve_compile, resolve_device, resolve_dtype


@dataclass
class BenchConfig:
    T: int | None = None  # context length; None: 4096 on a GPU, 256 on CPU
    batch_size: int | None = None  # None: 8 on a GPU, 4 on CPU
    steps: int | None = None  # timed steps after 3 warmup steps; None: 20 on a GPU, 3 on CPU
    schemes: tuple[str, ...] = tuple(SCHEMES)  # position schemes to measure
    compile: Literal["auto", True, False] = "auto"  # auto: what train.py picks for a long run on this machine
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: what train.py picks (bf16 where native)
    side_by_side: bool = False  # fp32 eager learned beside every scheme at dtype/compile, in interleaved rounds
    rounds: int = 5  # side by side: rounds of `steps` steps per model, in turn; the median round is reported
    device: str = "auto"
    out: str = ""  # also write the results as JSON here
    model: GPTConfig = field(default_factory=GPTConfig)  # the shape; block_size and pos_encoding are set per run

    def __post_init__(self):
        check_fields(self)
        at_least(self, 1, "T", "batch_size", "steps", "rounds")
        for scheme in self.schemes:
            dataclasses.replace(self.model, pos_encoding=scheme)  # an unknown scheme fails here, in one line


def make_step(config, batch_size, device, compile, bf16):
    """(model, step): one forward+backward+AdamW step on a fixed random batch, as train.py takes it."""
    torch.manual_seed(0)
    model = GPT(config).to(device)
    opt = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), device.type)
    step_model = torch.compile(model) if compile else model
    idx = torch.randint(0, config.vocab_size, (batch_size, config.block_size + 1), device=device)
    x, y = idx[:, :-1], idx[:, 1:]
    mixed_precision = autocast(device.type, "bfloat16" if bf16 else "float32")

    def step():
        with mixed_precision:
            _, loss = step_model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):  # warmup (and compilation)
        step()
    return model, step


def timed(step, steps, device):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - t0) / steps


def bench(config, batch_size, steps, device, compile, bf16):
    model, step = make_step(config, batch_size, device, compile, bf16)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    dt = timed(step, steps, device)
    tokens_per_sec = batch_size * config.block_size / dt
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    mfu = model.estimate_mfu(tokens_per_sec, config.block_size) if device.type == "cuda" else float("nan")
    return dict(scheme=config.pos_encoding, T=config.block_size, batch_size=batch_size, ms_per_step=1000 * dt,
                tokens_per_sec=tokens_per_sec, peak_mem_gib=peak, mfu_h100=mfu, params=model.num_params())


def side_by_side(cfg, T, batch_size, steps, device):
    """fp32 eager `learned` (the step nanoGPT takes at this shape) and every scheme at the dtype and compile
    train.py would choose (or the ones given), measured in interleaved rounds so that drifts in the machine's
    speed hit all alike; the median round per model, and its ratio to the reference."""
    dtype, why_dtype = resolve_dtype(cfg.dtype, device.type)
    compile, why_compile = resolve_compile(cfg.compile, device.type, COMPILE_MIN_STEPS)
    print(f"chosen: dtype={dtype} ({why_dtype}); compile={compile} ({why_compile})")
    cases = {"learned fp32 eager (reference)": (dataclasses.replace(cfg.model, block_size=T, pos_encoding="learned"),
                                                False, False)}
    for scheme in cfg.schemes:
        cases[f"{scheme} {dtype}{' compiled' if compile else ''}"] = (
            dataclasses.replace(cfg.model, block_size=T, pos_encoding=scheme), compile, dtype == "bfloat16")
    steppers = {k: make_step(c, batch_size, device, comp, bf16)[1] for k, (c, comp, bf16) in cases.items()}
    times = {k: [] for k in cases}
    for _ in range(cfg.rounds):
        for k, step in steppers.items():
            times[k].append(timed(step, steps, device))
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    ref = ms[next(iter(ms))]
    rope = next((v for k, v in ms.items() if k.startswith("rope ")), None)
    print(f"{'model':<36} {'ms/step':>8} {'vs reference':>13} {'vs rope':>8}")
    for k, v in ms.items():
        print(f"{k:<36} {v:8.1f} {ref / v:12.2f}x {rope / v if rope else float('nan'):7.2f}x")
    return [dict(model=k, ms_per_step=v, speedup=ref / v) for k, v in ms.items()]


def main(argv=None):
    cfg = parse(BenchConfig, argv, doc=__doc__)
    device = torch.device(resolve_device(cfg.device))
    cuda = device.type == "cuda"
    T, batch_size = cfg.T or (4096 if cuda else 256), cfg.batch_size or (8 if cuda else 4)
    steps = cfg.steps or (20 if cuda else 3)
    bf16 = resolve_dtype(cfg.dtype, device.type)[0] == "bfloat16"
    compile = resolve_compile(cfg.compile, device.type, COMPILE_MIN_STEPS)[0]
    print(f"device={device} T={T} batch={batch_size} threads={torch.get_num_threads()} "
          f"n_layer={cfg.model.n_layer} n_head={cfg.model.n_head} n_embd={cfg.model.n_embd} "
          f"vocab={cfg.model.vocab_size} torch {torch.__version__}")
    if cfg.side_by_side:
        rows = side_by_side(cfg, T, batch_size, steps, device)
        if cfg.out:
            with open(cfg.out, "w") as f:
                json.dump(dict(device=str(device), torch=torch.__version__, rows=rows), f, indent=1)
        return rows
    print(f"bf16={bf16} compile={compile}")
    print(f"{'scheme':<11} {'ms/step':>9} {'tokens/s':>10} {'MFU':>6} {'peak GiB':>9}")
    rows = []
    for scheme in cfg.schemes:
        config = dataclasses.replace(cfg.model, block_size=T, pos_encoding=scheme)
        r = bench(config, batch_size, steps, device, compile, bf16)
        rows.append(r)
        print(f"{scheme:<11} {r['ms_per_step']:9.1f} {r['tokens_per_sec']:10.0f} {r['mfu_h100']:6.1%} "
              f"{r['peak_mem_gib']:9.2f}", flush=True)
    if cfg.out:
        with open(cfg.out, "w") as f:
            json.dump(dict(device=str(device), gpu=torch.cuda.get_device_name() if cuda else None,
                           torch=torch.__version__, config=dataclasses.asdict(cfg), rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    cli(main)
