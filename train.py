"""Train a GPT: AdamW, linear warmup + cosine decay, gradient accumulation, bf16 autocast on CUDA.

    python train.py configs/cpu_rope.toml --max_iters=200
    python train.py configs/cpu_rope.toml --resume=true           # continue exactly from <out_dir>/ckpt.pt
    torchrun --standalone --nproc_per_node=8 train.py configs/gpt2_124m_rope.toml   # DDP

`main(cfg)` is the whole loop; extend_context.py and the tests call it instead of copying it. Metrics go to
<out_dir>/metrics.jsonl (one JSON object per line), the resolved config to <out_dir>/config.json.
"""
import dataclasses
import json
import math
import os
import random
import signal
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import (CheckpointError, FORMAT_VERSION, load_checkpoint, load_weights, model_config,  # noqa: F401
                        model_from_checkpoint, rng_state, save_checkpoint, set_rng_state)
from config import ConfigError, TrainConfig, config_to_dict, load_config
from data.loader import BatchSampler, data_identity
from model import GPT



class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss)."""


# ----------------------------------------------------------------------------- helpers

def get_lr(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to learning_rate, then cosine decay to min_lr at lr_decay_iters."""
    decay_iters = cfg.max_iters if cfg.lr_decay_iters is None else cfg.lr_decay_iters
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1)
    if step >= decay_iters:
        return cfg.min_lr
    ratio = (step - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill in device, dtype and lr_decay_iters ("auto" / None) for this machine."""
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    if dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"bad value {dtype!r} for config key 'dtype': expected auto, float32 or bfloat16")
    decay = cfg.max_iters if cfg.lr_decay_iters is None else cfg.lr_decay_iters
    return dataclasses.replace(cfg, device=device, dtype=dtype, lr_decay_iters=decay)


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def _every(step: int, interval: int) -> bool:
    return interval > 0 and step % interval == 0


@torch.no_grad()
def estimate_loss(model, sampler, start_state, eval_iters, autocast, device) -> torch.Tensor:
    """Mean loss over the same eval_iters validation batches every time (the sampler is rewound)."""
    sampler.load_state_dict(start_state)
    model.eval()
    total = torch.zeros((), device=device)
    for _ in range(eval_iters):
        x, y = sampler.next()
        with autocast:
            _, loss = model(x, y)
        total += loss.float()
    model.train()
    return total / max(1, eval_iters)


class StopOnInterrupt:
    """The first Ctrl-C (or SIGTERM) asks the loop to stop at the next step and save; a second one aborts."""
    requested = 0.0  # when the first signal came (monotonic seconds); 0: none

    def __enter__(self):
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handler(self, signum, frame):
        # a second signal aborts, unless it comes within a second (`timeout` and torchrun may signal twice at once)
        if self.requested and time.monotonic() - self.requested > 1.0:
            raise KeyboardInterrupt
        if not self.requested:
            self.requested = time.monotonic()
            print("interrupted: stopping after this step and saving a checkpoint (again to abort)", file=sys.stderr)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def start_wandb(cfg: TrainConfig, out_dir: Path):
    """None when off or unavailable. 'online' without an API key falls back to 'offline' instead of hanging."""
    if cfg.wandb == "off":
        return None
    try:
        import wandb
    except ImportError:
        print(f"warning: wandb={cfg.wandb} but wandb is not installed (pip install wandb); "
              "metrics go to metrics.jsonl only", file=sys.stderr)
        return None
    mode = cfg.wandb
    if mode == "online" and not _wandb_key():
        print("warning: wandb=online but no API key (WANDB_API_KEY or ~/.netrc): logging offline", file=sys.stderr)
        mode = "offline"
    run_name = cfg.run_name or out_dir.resolve().name
    try:
        return wandb.init(project=cfg.wandb_project, name=run_name, dir=str(out_dir), mode=mode,
                          config=config_to_dict(cfg), settings=wandb.Settings(init_timeout=60))
    except Exception as e:
        print(f"warning: wandb could not start ({str(e).splitlines()[0]}): metrics.jsonl only", file=sys.stderr)
        return None


def _wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


# ----------------------------------------------------------------------------- the loop

def main(cfg: TrainConfig) -> dict:
    """Train; returns the final metrics and the path of the last checkpoint."""
    rank, world, local_rank = (int(os.environ.get(k, 0)) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))  # torchrun's
    ddp, world = world > 1, max(world, 1)
    cfg = resolve(cfg)
    device = cfg.device
    if ddp:
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        return _train(cfg, device, rank, world)
    finally:
        if ddp:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, device: str, rank: int, world: int) -> dict:
    master, device_type = rank == 0, device.split(":")[0]
    log = print if master else (lambda *a, **k: None)
    torch.manual_seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    out_dir, ckpt_path = Path(cfg.out_dir), Path(cfg.out_dir) / "ckpt.pt"
    out_dir.mkdir(parents=True, exist_ok=True)

    ckpt = load_checkpoint(ckpt_path) if cfg.resume else None
    if ckpt is not None:  # the checkpoint's architecture wins
        saved = model_config(ckpt, ckpt_path)
        changed = [f"{f.name}={getattr(cfg.model, f.name)!r}" for f in dataclasses.fields(saved)
                   if getattr(saved, f.name) != getattr(cfg.model, f.name)]
        if changed:
            log(f"warning: resuming with the checkpoint's model config; ignoring {', '.join(changed)}")
        cfg = dataclasses.replace(cfg, model=saved)
        model = load_weights(GPT(saved), ckpt["model"], ckpt_path)
    elif cfg.init_from != "scratch":  # weights only; this run's block_size and rope_scaling
        init = load_checkpoint(cfg.init_from)
        config = dataclasses.replace(model_config(init, cfg.init_from), block_size=cfg.model.block_size,
                                     rope_scaling=cfg.model.rope_scaling, dropout=cfg.model.dropout,
                                     activation_checkpointing=cfg.model.activation_checkpointing,
                                     attn_backend=cfg.model.attn_backend)
        cfg = dataclasses.replace(cfg, model=config)
        model = load_weights(GPT(config), init["model"], cfg.init_from)
        del init
    else:
        model = GPT(cfg.model)
    raw_model = model.to(device)
    optimizer = raw_model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device_type)
    if cfg.compile:
        model = torch.compile(model)
    eval_model = model
    if world > 1:
        model = DDP(model, device_ids=[int(device.split(":")[1])] if device_type == "cuda" else None)
    autocast = torch.autocast(device_type, dtype=torch.bfloat16) if cfg.dtype == "bfloat16" else nullcontext()

    T = cfg.model.block_size
    train_sampler = BatchSampler(cfg.data_dir, "train", cfg.batch_size, T, cfg.seed, device,
                                 min_doc_len=cfg.min_doc_len or None, rank=rank, world_size=world)
    val_sampler = BatchSampler(cfg.data_dir, "val", cfg.batch_size, T, cfg.seed + 1, device,
                               rank=rank, world_size=world)
    val_start = val_sampler.state_dict()
    data = data_identity(cfg.data_dir)

    step, best_val = 0, float("inf")
    if ckpt is not None:
        step, best_val = ckpt["step"], ckpt.get("best_val_loss", float("inf"))
        if ckpt.get("optimizer"):  # a training-free checkpoint (extend_context.py --steps=0) has none
            optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("sampler"):
            train_sampler.load_state_dict(ckpt["sampler"])  # the same for every rank: a seed and a batch count
        ranks = ckpt.get("ranks") or [{"rng": ckpt.get("rng")}]
        if len(ranks) == world and ranks[rank]["rng"]:
            set_rng_state(ranks[rank]["rng"])
        else:
            log(f"warning: the checkpoint has no RNG state for {world} process(es): dropout restarts from the seed")
        if {**(ckpt.get("data") or {}), "path": None} != {**data, "path": None}:  # same tokens, wherever they lie
            log(f"warning: the data at {cfg.data_dir} differs from the data this checkpoint was trained on")
        del ckpt
    start_step = step

    metrics_path = out_dir / "metrics.jsonl"
    wandb_run = None
    if master:
        old = metrics_path.read_text().splitlines() if cfg.resume and metrics_path.exists() else []
        metrics_path.write_text("".join(ln + "\n" for ln in old if _step_of(ln) <= start_step))  # drop the unsaved tail
        info = {"config": config_to_dict(cfg), "data": data, "seed": cfg.seed, "torch": torch.__version__,
                "world_size": world, "start_step": start_step, "n_params": raw_model.num_params()}
        (out_dir / "config.json").write_text(json.dumps(info, indent=2) + "\n")
        wandb_run = start_wandb(cfg, out_dir)

    def record(**metrics):
        if master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
            if wandb_run is not None:
                wandb_run.log({f"{metrics['kind']}/{k}": v for k, v in metrics.items() if k not in ("kind", "step")},
                              step=metrics["step"])

    def save(step):
        ranks = [{"rng": rng_state()}] * world
        if world > 1:  # each rank's own RNG (dropout); the sampler state is the same on every rank
            dist.all_gather_object(ranks, ranks[0])
        if not master:
            return None
        ckpt = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "iter_num": step,
                "config": config_to_dict(cfg), "rng": ranks[0]["rng"], "sampler": train_sampler.state_dict(),
                "data": data, "best_val_loss": best_val, "format_version": FORMAT_VERSION}
        if world > 1:
            ckpt["ranks"] = ranks
        try:
            return save_checkpoint(ckpt, ckpt_path)
        except CheckpointError as e:
            print(f"error: {e}", file=sys.stderr)
            return None

    log(f"{cfg.model.pos_encoding}: {raw_model.num_params() / 1e6:.2f}M parameters, T={T}, device={device}, "
        f"dtype={cfg.dtype}, world={world}, steps {start_step}->{cfg.max_iters}")
    tokens_per_step = cfg.batch_size * T * cfg.grad_accum_steps * world
    last_ckpt = str(ckpt_path) if cfg.resume else None
    val_loss = train_loss = tokens_per_sec = mfu = None
    step_times, interrupted = [], False
    try:
        with StopOnInterrupt() as stop:
            while True:
                last = step >= cfg.max_iters
                if (not interrupted and (last or _every(step, cfg.eval_interval))
                        and not (cfg.resume and step == start_step)):
                    val = estimate_loss(eval_model, val_sampler, val_start, cfg.eval_iters, autocast, device)
                    if world > 1:
                        dist.all_reduce(val)
                    val_loss = val.item() / world
                    best_val = min(best_val, val_loss)
                    log(f"step {step} | val loss {val_loss:.4f}")
                    record(kind="val", step=step, loss=val_loss)
                if step > start_step and (last or interrupted or _every(step, cfg.ckpt_interval)):
                    last_ckpt = save(step) or last_ckpt
                if last or interrupted:
                    break

                lr = get_lr(step, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                t0 = time.perf_counter()
                loss_sum = torch.zeros((), device=device)
                for micro in range(cfg.grad_accum_steps):
                    x, y = train_sampler.next()
                    sync = model.no_sync() if world > 1 and micro < cfg.grad_accum_steps - 1 else nullcontext()
                    with sync:  # DDP all-reduces gradients on the last micro-step only
                        with autocast:
                            _, loss = model(x, y)
                        (loss / cfg.grad_accum_steps).backward()
                    loss_sum += loss.detach().float()
                stop_flag = torch.tensor(float(stop.requested > 0), device=device)
                stats = torch.stack([loss_sum / cfg.grad_accum_steps, stop_flag])
                if world > 1:  # every rank sees the same loss and stop request, so all stop at the same step
                    dist.all_reduce(stats)
                train_loss, interrupted = stats[0].item() / world, bool(stats[1].item() > 0)
                if not math.isfinite(train_loss):
                    raise TrainingError(f"non-finite loss ({train_loss}) at step {step + 1}: stopped before the "
                                        f"optimizer step; last checkpoint: {last_ckpt or 'none'}. "
                                        "Try a lower learning_rate")
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1

                dt = time.perf_counter() - t0  # the loss .item() above waited for the GPU
                if step > start_step + 1:  # the first step pays for compilation
                    step_times.append(dt)
                if _every(step, cfg.log_interval) or step == cfg.max_iters:
                    times = step_times or [dt]
                    tokens_per_sec = tokens_per_step * len(times) / sum(times)
                    mfu = raw_model.estimate_mfu(tokens_per_sec / world, T, cfg.peak_flops)
                    ms = 1000 * sum(times) / len(times)
                    log(f"step {step} | loss {train_loss:.4f} | lr {lr:.2e} | {tokens_per_sec:,.0f} tok/s | "
                        f"mfu {100 * mfu:.2f}% | {ms:.1f} ms/step")
                    record(kind="train", step=step, loss=train_loss, lr=lr, tokens_per_sec=tokens_per_sec, mfu=mfu,
                           ms_per_step=ms)
                    step_times = []
    finally:
        if wandb_run is not None:
            wandb_run.finish()
    return {"step": step, "train_loss": train_loss, "val_loss": val_loss, "best_val_loss": best_val,
            "tokens_per_sec": tokens_per_sec, "mfu": mfu, "ckpt": last_ckpt, "out_dir": str(out_dir),
            "interrupted": interrupted}


if __name__ == "__main__":
    try:
        main(load_config(sys.argv[1:]))
    except (ValueError, FileNotFoundError, TrainingError) as e:  # ConfigError and CheckpointError are ValueErrors
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("aborted")
