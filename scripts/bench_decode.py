"""Decode speed: tokens/s with the KV cache vs recomputing the whole context, at several context lengths.

    python -m scripts.bench_decode                                        # ~30M shape, rope, 1k and 4k, CPU or GPU
    python -m scripts.bench_decode --contexts=1024,4096,32768 --out=out/bench_decode.json
    python -m scripts.bench_decode --pos_encoding=alibi --n_layer=2 --n_embd=128 --n_head=4

Random weights (speed does not depend on them); any GPTConfig key is a flag. Both paths run generation.generate
greedily from a random prompt of `context` tokens: the first token costs a prefill, and the tokens after it
are what is timed.
"""

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from model import GPT, GPTConfig
from posenc.cli import cli
from posenc.config import ConfigError, at_least, check_fields, parse
from posenc.generation import generate, to_inference_dtype
from posenc.runtime import resolve_device, resolve_dtype


@dataclass
class DecodeBenchConfig:
    contexts: tuple[int, ...] = (1024, 4096)  # prompt lengths
    new_tokens: int = 32  # tokens generated with the cache
    recompute_tokens: int | None = None  # tokens for the slow path; None: new_tokens on a GPU, 8 on CPU
    batch_size: int = 1
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    compile: bool = False  # compile the one-token decode step (static shapes: once per context length)
    profile: bool = False  # also print where a cached token's time goes (torch.profiler, the first context)
    out: str = ""  # also write the results as JSON here
    model: GPTConfig = field(default_factory=lambda: GPTConfig(n_layer=6, n_head=6, n_embd=384))  # block_size: set

    def __post_init__(self):
        check_fields(self)
        at_least(self, 2, "new_tokens", "recompute_tokens")
        at_least(self, 1, "batch_size")
        if not self.contexts or min(self.contexts) < 1:
            raise ConfigError(f"bad value {self.contexts!r} for config key 'contexts': expected positive lengths")


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_generate(model, prompt, n_new, use_cache, device, compile=False):
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
    generate(model, prompt, n_new, temperature=0.0, use_cache=use_cache, on_token=first_token, compile=compile)
    sync(device)
    decode_s = time.perf_counter() - stamps[0]
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    return stamps[0] - t0, prompt.size(0) * (n_new - 1) / decode_s, peak


def print_profile(model, cfg, vocab_size, device, rows=12):
    """The ops that take a cached token's time: new_tokens greedy steps after a prompt of the first context,
    profiled (the prefill is outside the window: its forward runs before the first on_token)."""
    from torch.profiler import ProfilerActivity, profile
    prompt = torch.randint(0, vocab_size, (cfg.batch_size, cfg.contexts[0]), device=device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    prof, started = profile(activities=activities), []

    def start_after_prefill(tok):
        if not started:
            started.append(prof.start())

    generate(model, prompt, cfg.new_tokens, temperature=0.0, on_token=start_after_prefill, compile=cfg.compile)
    sync(device)
    prof.stop()
    sort = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    print(f"where {cfg.new_tokens - 1} cached tokens' time goes (context {cfg.contexts[0]}, top {rows} by self time):")
    print(prof.key_averages().table(sort_by=sort, row_limit=rows))


def main(argv=None):
    cfg = parse(DecodeBenchConfig, argv, doc=__doc__)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)[0]
    n_recompute = cfg.recompute_tokens or (cfg.new_tokens if device.startswith("cuda") else 8)
    config = dataclasses.replace(cfg.model, block_size=max(cfg.contexts) + max(cfg.new_tokens, n_recompute))
    torch.manual_seed(0)
    model = to_inference_dtype(GPT(config).to(device), dtype)
    model.transformer.pos.prepare(config.block_size, device)  # tables at full size: growing them recompiles
    print(f"{model.num_params() / 1e6:.1f}M parameters, {config.pos_encoding}, {device} {dtype}, "
          f"batch {cfg.batch_size}{', compiled' if cfg.compile else ''}")
    print(f"{'context':>8} {'cache tok/s':>12} {'recompute tok/s':>16} {'speedup':>8} {'prefill ms':>11}"
          f" {'peak MB cache':>14} {'peak MB recompute':>18}")
    results = []
    for ctx in cfg.contexts:
        prompt = torch.randint(0, config.vocab_size, (cfg.batch_size, ctx), device=device)
        warm = 2 if device.startswith("cuda") or ctx == cfg.contexts[0] else 0  # kernels, allocator, compilation
        for use_cache in (True, False):
            for _ in range(warm):  # the same length as the timed run: a compiled step is compiled for its cache
                generate(model, prompt, cfg.new_tokens if use_cache else 3, temperature=0.0, use_cache=use_cache,
                         compile=cfg.compile)
        prefill_s, cached, peak_c = timed_generate(model, prompt, cfg.new_tokens, True, device, cfg.compile)
        _, recompute, peak_r = timed_generate(model, prompt, n_recompute, False, device)
        r = dict(context=ctx, cache_tok_s=cached, recompute_tok_s=recompute, speedup=cached / recompute,
                 prefill_ms=1e3 * prefill_s, peak_mb_cache=peak_c, peak_mb_recompute=peak_r)
        results.append(r)
        mem = f"{peak_c:14.0f} {peak_r:18.0f}" if peak_c is not None else f"{'-':>14} {'-':>18}"
        print(f"{ctx:8d} {cached:12.1f} {recompute:16.2f} {r['speedup']:7.1f}x {r['prefill_ms']:11.1f} {mem}",
              flush=True)
    if cfg.profile:
        print_profile(model, cfg, config.vocab_size, device)
    if cfg.out:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
        info = dict(device=torch.cuda.get_device_name() if device.startswith("cuda") else device,
                    dtype=dtype, torch=torch.__version__, config=dataclasses.asdict(cfg), model=dataclasses.asdict(config),
                    recompute_tokens=n_recompute)
        with open(cfg.out, "w") as f:
            json.dump(dict(info, results=results), f, indent=2)
        print(f"wrote {cfg.out}")
    return results


if __name__ == "__main__":
    cli(main)
