r"""Peak memory and step time of a PoSE step against a base-length step and a full-length fine-tune step.

    python -m scripts.bench_pose                          # CPU: the CPU scale's model, L=256, PoSE to 4L, batch 8
    python -m scripts.bench_pose --factor=8 --L=4096 --batch_size=8 --n_layer=6 --n_head=6 --n_embd=384   # GPU

Each case runs in a fresh process, so that a CPU's peak resident memory is that case's alone:
  base         RoPE at L, batch_size sequences of L tokens (the base run's step)
  pose         the model extended to factor·L (PI), batch_size windows of L with PoSE position ids (posenc/pose.py)
  full_tokens  a full-length fine-tune with the same tokens per step: batch_size/factor sequences of factor·L
               (what extend_context.py does by default, so PoSE and it train on equal tokens)
  full_batch   a full-length fine-tune with as many sequences as the base: batch_size of factor·L (the
               comparison in the PoSE paper)
Memory: torch.cuda.max_memory_allocated on a GPU; on a CPU the growth of the process's peak resident set
(ru_maxrss) over its size before the first step. A step is forward, backward and AdamW, fp32 eager unless
--dtype/--compile say otherwise; the median of --steps timed steps after 2 warmup steps. Measures; asserts
nothing. Prints a table and, with --out=path.json, writes it.
"""

import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from model import GPT, GPTConfig
from posenc.cli import cli
from posenc.config import at_least, check_fields, parse
from posenc.pose import pose_positions
from posenc.rope_scaling import scaling_dict
from posenc.runtime import autocast, resolve_device

CASES = ("base", "pose", "full_tokens", "full_batch")


@dataclass
class BenchPoSEConfig:
    L: int = 256  # the base length (PoSE's window)
    factor: int = 4  # PoSE's position ids and the full-length fine-tune reach factor * L
    batch_size: int = 8  # sequences of L per step (the base run's batch)
    chunks: int = 2  # PoSE chunks per window
    steps: int = 5  # timed steps after 2 warmup steps
    dtype: Literal["float32", "bfloat16"] = "float32"  # bfloat16: autocast, as train.py on a GPU
    compile: bool = False
    device: str = "auto"
    case: str = ""  # "": every case, each in its own process; else only this one, here (the child's flag)
    out: str = ""  # also write the results as JSON here
    model: GPTConfig = field(default_factory=lambda: GPTConfig(vocab_size=4096))  # the CPU scale's shape

    def __post_init__(self):
        check_fields(self)
        at_least(self, 1, "L", "factor", "batch_size", "chunks", "steps")
        if self.case and self.case not in CASES:
            raise ValueError(f"bad value {self.case!r} for config key 'case': choose one of {', '.join(CASES)}")
        if self.batch_size % self.factor:
            raise ValueError(f"batch_size={self.batch_size} must be a multiple of factor={self.factor}, so that "
                             "full_tokens has batch_size / factor whole sequences")


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(cfg, case, device):
    """One case in this process: {case, T, batch, tokens per step, ms per step, peak memory}."""
    target = cfg.factor * cfg.L
    scaled = dataclasses.replace(cfg.model, pos_encoding="rope", block_size=target,
                                 rope_scaling=scaling_dict("linear", cfg.factor, cfg.L))
    model_cfg, T, B = {"base": (dataclasses.replace(cfg.model, pos_encoding="rope", block_size=cfg.L), cfg.L,
                                cfg.batch_size),
                       "pose": (scaled, cfg.L, cfg.batch_size),
                       "full_tokens": (scaled, target, cfg.batch_size // cfg.factor),
                       "full_batch": (scaled, target, cfg.batch_size)}[case]
    torch.manual_seed(0)
    model = GPT(model_cfg).to(device)
    opt = model.configure_optimizers(0.0, 1e-4, (0.9, 0.95), device.type)
    step_model = torch.compile(model) if cfg.compile else model
    mixed_precision = autocast(device.type, cfg.dtype)
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(0, model_cfg.vocab_size, (B, T + 1), generator=generator).to(device)
    x, y = batch[:, :-1], batch[:, 1:]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        pos = pose_positions(B, T, target, cfg.chunks, generator).to(device) if case == "pose" else None
        with mixed_precision:
            _, loss = step_model(x, y, pos=pos)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    before = peak_rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(2 + cfg.steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_bytes() - before
    return dict(case=case, T=T, batch_size=B, tokens_per_step=B * T, ms_per_step=1000 * statistics.median(times),
                peak_mib=peak / 2**20, memory="cuda max_memory_allocated" if device.type == "cuda" else
                "peak RSS growth over the size before the first step")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse(BenchPoSEConfig, argv, doc=__doc__)
    device = torch.device(resolve_device(cfg.device))
    if cfg.case:
        print(json.dumps(measure(cfg, cfg.case, device)))
        return None
    print(f"device={device} L={cfg.L} target={cfg.factor * cfg.L} batch={cfg.batch_size} chunks={cfg.chunks} "
          f"threads={torch.get_num_threads()} n_layer={cfg.model.n_layer} n_embd={cfg.model.n_embd} "
          f"dtype={cfg.dtype} compile={cfg.compile} torch {torch.__version__}")
    rows = []
    for case in CASES:  # a fresh process each: a CPU's peak RSS never goes down
        run = subprocess.run([sys.executable, "-m", __spec__.name, *argv, f"--case={case}"], capture_output=True, text=True)
        if run.returncode:
            raise RuntimeError(f"case {case} failed: {run.stderr.strip().splitlines()[-1] if run.stderr else ''}")
        rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
    base = rows[0]
    print(f"{'case':<12} {'T':>6} {'batch':>6} {'tokens':>7} {'ms/step':>9} {'vs base':>8} {'peak MiB':>9} "
          f"{'vs base':>8}")
    for r in rows:
        print(f"{r['case']:<12} {r['T']:6d} {r['batch_size']:6d} {r['tokens_per_step']:7d} {r['ms_per_step']:9.1f} "
              f"{r['ms_per_step'] / base['ms_per_step']:7.2f}x {r['peak_mib']:9.1f} "
              f"{r['peak_mib'] / base['peak_mib']:7.2f}x")
    print(f"memory: {base['memory']}")
    if cfg.out:
        with open(cfg.out, "w") as f:
            json.dump(dict(device=str(device), torch=torch.__version__, config=dataclasses.asdict(cfg), rows=rows),
                      f, indent=1)
    return rows


if __name__ == "__main__":
    cli(main)
