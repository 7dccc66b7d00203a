r"""Time and peak memory against length, per position scheme: does every scheme run 32k tokens in memory that
grows linearly?

    python -m scripts.bench_length                          # every scheme, 4k-32k: table + docs/bench_length.png
    python -m scripts.bench_length --schemes=rope,alibi --lengths=4096,8192 --figure=""   # a subset, no figure
    python -m scripts.bench_length --view_rows=256 --schemes=alibi   # smaller query blocks
    python -m scripts.bench_length --lengths= --figure=""   # the training step alone

Per scheme: one training step (forward, backward, AdamW) at train_len, batch 1, timed in train_rounds processes
(the median), and one no-grad forward at each length. The model is the CPU scale's shape (4 layers, 4 heads,
width 128, vocabulary 4096) under the autocast dtype of every stage (posenc.runtime.resolve_dtype: bf16 where
the CPU computes it natively). Every case runs in its own process, whose peak resident memory (ru_maxrss, the
Python interpreter and torch included) is its memory: so one case's memory never hides in another's. Measures;
asserts nothing.
"""

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from posenc.cli import cli
from posenc.config import at_least, check_fields, parse
from posenc.positions import SCHEMES
from posenc.runtime import autocast, resolve_dtype

SHAPE = dict(n_layer=4, n_head=4, n_embd=128, vocab_size=4096)  # the CPU scale's model
GIB = 2 ** 30
# A process's first steps run slower (the allocator and kernels warming up): with one warm-up step and the median
# of three, T5's step measured 1.39x RoPE's in one run and 1.05x ALiBi's in-process over five steps.
TRAIN_WARMUP, TRAIN_STEPS = 2, 5


@dataclass
class LengthBenchConfig:
    schemes: tuple[str, ...] = tuple(SCHEMES)
    lengths: tuple[int, ...] = (4096, 8192, 16384, 32768)  # no-grad forward at each
    train_len: int = 4096  # one training step at this length (0: none)
    threads: int = 2
    train_rounds: int = 3  # the training step is timed this many times per scheme, each in its own process
    block_elements: int = 0  # posenc.attention.BLOCK_ELEMENTS (materialized blocks) for this run; 0: its default
    view_rows: int = 0  # posenc.attention.VIEW_ROWS (blocks whose mask is a view: ALiBi, T5); 0: its default
    figure: str = "docs/bench_length.png"  # "": no figure
    out: str = ""  # also write the rows as JSON here
    case: str = ""  # internal: run one case (scheme,kind,T) in this process and print its JSON

    def __post_init__(self):
        check_fields(self)
        at_least(self, 1, "threads")
        if min(self.lengths, default=1) < 1 or not (self.lengths or self.train_len):
            raise ValueError(f"bad value {self.lengths!r} for config key 'lengths': expected lengths >= 1 (or only a "
                             "training step: --lengths= --train_len=4096)")
        at_least(self, 0, "train_len", "block_elements", "view_rows")
        at_least(self, 1, "train_rounds")
        unknown = [s for s in self.schemes if s not in SCHEMES]
        if unknown:
            raise ValueError(f"bad value {','.join(unknown)!r} for config key 'schemes': choose from {', '.join(SCHEMES)}")


def run_case(scheme, kind, T, cfg):
    """One measurement in this process: {"seconds", "peak_gib"}. train: the median of TRAIN_STEPS steps after
    TRAIN_WARMUP; forward: one forward after a short warm-up one."""
    from model import GPT, GPTConfig
    import posenc.attention
    torch.set_num_threads(cfg.threads)
    posenc.attention.BLOCK_ELEMENTS = cfg.block_elements or posenc.attention.BLOCK_ELEMENTS
    posenc.attention.VIEW_ROWS = cfg.view_rows or posenc.attention.VIEW_ROWS
    dtype, _ = resolve_dtype("auto", "cpu")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=T, pos_encoding=scheme, **SHAPE))
    idx = torch.randint(0, SHAPE["vocab_size"], (1, T + 1))
    if kind == "train":
        model.train()
        opt = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), "cpu")
        times = []
        for _ in range(TRAIN_WARMUP + TRAIN_STEPS):
            t0 = time.perf_counter()
            with autocast("cpu", dtype):
                loss = model(idx[:, :-1], idx[:, 1:])[1]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
        seconds = statistics.median(times[TRAIN_WARMUP:])
    else:
        model.eval()
        with torch.no_grad(), autocast("cpu", dtype):
            model(idx[:, :256])  # warm-up: kernels and tables
            t0 = time.perf_counter()
            model(idx[:, :T], last_only=True)
            seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB}


def measure(scheme, kind, T, cfg):
    """run_case in a fresh process; a case that fails (out of memory) is {"error": its last line}."""
    argv = [sys.executable, "-m", "scripts.bench_length", f"--case={scheme},{kind},{T}", f"--threads={cfg.threads}",
            f"--block_elements={cfg.block_elements}", f"--view_rows={cfg.view_rows}"]
    env = os.environ | {"OMP_NUM_THREADS": str(cfg.threads)}
    p = subprocess.run(argv, capture_output=True, text=True, env=env)
    if p.returncode:
        last = (p.stderr.strip().splitlines() or [f"exit status {p.returncode}"])[-1]
        return {"error": last[:120]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def median_run(runs):
    """Several measurements of one case: the median time and the largest peak memory; a failure if any failed."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    return {"seconds": statistics.median(r["seconds"] for r in runs), "peak_gib": max(r["peak_gib"] for r in runs)}


def cell(r):
    return f"{r['seconds']:.2f} s, {r['peak_gib']:.2f} GiB" if "seconds" in r else f"failed: {r['error']}"


def table(rows, cfg):
    """Markdown: one row per scheme; time and peak memory per case, and the ratio to RoPE's time."""
    cases = ([("train", cfg.train_len)] if cfg.train_len else []) + [("forward", T) for T in cfg.lengths]
    head = [f"training step at {T}" if k == "train" else f"forward at {T}" for k, T in cases]
    out = ["| scheme | " + " | ".join(head) + " |", "|---|" + "---|" * len(cases)]
    for scheme in cfg.schemes:
        cells = []
        for k, T in cases:
            r, ref = rows[scheme][f"{k}@{T}"], rows.get("rope", {}).get(f"{k}@{T}", {})
            ratio = f" ({r['seconds'] / ref['seconds']:.2f}×)" if "seconds" in r and "seconds" in ref else ""
            cells.append(cell(r) + ratio)
        out.append(f"| {scheme} | " + " | ".join(cells) + " |")
    return out


def plot(rows, cfg, path):
    """One figure, two panels: forward time and peak memory against length, one line per scheme, log-log axes
    with the measured lengths marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for scheme in cfg.schemes:
        pts = [(T, rows[scheme][f"forward@{T}"]) for T in cfg.lengths if "seconds" in rows[scheme][f"forward@{T}"]]
        style = dict(marker="o", linewidth=2.4 if scheme == "rope" else 1.4, label=scheme)
        ax_t.plot([T for T, _ in pts], [r["seconds"] for _, r in pts], **style)
        ax_m.plot([T for T, _ in pts], [r["peak_gib"] for _, r in pts], **style)
    ax_m.axhline(4, color="gray", linestyle="--", linewidth=1)
    ax_m.annotate("goal: 4 GiB", (cfg.lengths[0], 4), xytext=(2, -12), textcoords="offset points", color="gray")
    for ax, ylabel, title in ((ax_t, "seconds (log)", "No-grad forward: time"),
                              (ax_m, "peak resident memory, GiB", "No-grad forward: peak memory of its process")):
        ax.set(xscale="log", xlabel="tokens (log)", ylabel=ylabel, title=title)
        ax.set_xticks(cfg.lengths, [f"{T // 1024}k" for T in cfg.lengths])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    ax_t.set_yscale("log")
    ax_m.set_ylim(bottom=0)
    ax_t.legend(fontsize=8)
    fig.suptitle(f"Every scheme against length (4 layers, 4 heads, width 128, vocab 4096; {cfg.threads} threads)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine():
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    dtype, why = resolve_dtype("auto", "cpu")
    return f"{cpu}, {os.cpu_count()} cores; torch {torch.__version__}; {dtype} ({why})"


def main(argv=None):
    cfg = parse(LengthBenchConfig, argv, doc=__doc__)
    if cfg.case:
        scheme, kind, T = cfg.case.split(",")
        print(json.dumps(run_case(scheme, kind, int(T), cfg)))
        return None
    rows = {scheme: {} for scheme in cfg.schemes}
    if cfg.train_len:
        # Rounds over every scheme, not the rounds of one scheme in a row: a process's speed varies (measured
        # alone: RoPE's step 0.48 s in one process, 0.55 s in the next), and this VM's speed drifts over minutes,
        # which rounds spread over every scheme alike.
        runs = {scheme: [] for scheme in cfg.schemes}
        for _ in range(cfg.train_rounds):
            for scheme in cfg.schemes:
                runs[scheme].append(r := measure(scheme, "train", cfg.train_len, cfg))
                print(f"{scheme} train at {cfg.train_len}: {cell(r)}", file=sys.stderr, flush=True)
        for scheme in cfg.schemes:
            rows[scheme][f"train@{cfg.train_len}"] = median_run(runs[scheme])
    for scheme in cfg.schemes:
        for T in cfg.lengths:
            rows[scheme][f"forward@{T}"] = r = measure(scheme, "forward", T, cfg)
            print(f"{scheme} forward at {T}: {cell(r)}", file=sys.stderr, flush=True)
    lines = [f"Machine: {machine()}.", "", *table(rows, cfg)]
    print("\n".join(lines))
    if cfg.out:
        with open(cfg.out, "w") as f:
            json.dump({"machine": machine(), "rows": rows}, f, indent=1)
    if cfg.figure and cfg.lengths:
        plot(rows, cfg, cfg.figure)
        print(f"wrote {cfg.figure}")
    return rows


if __name__ == "__main__":
    cli(lambda argv: main(argv) and None)
