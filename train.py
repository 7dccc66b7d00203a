"""Train a GPT: AdamW, linear warmup + cosine decay, gradient accumulation, bf16 autocast on a GPU or a CPU with native bf16.

    python train.py configs/cpu.toml --pos_encoding=alibi           # -> out/cpu_alibi
    python train.py configs/cpu.toml --max_iters=200 --n_layer=2    # flags override the file
    python train.py configs/cpu.toml --pos_encoding=alibi --resume=true   # continue exactly where it stopped
    torchrun --standalone --nproc_per_node=8 train.py configs/gpt2_124m.toml   # DDP

`main(cfg)` is the whole loop, a short sequence of named steps (setup, evaluate, save, train_step, log_step)
that extend_context.py, reproduce.py and the tests call instead of copying it. Metrics go to
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
# Imported before init_process_group: its functions' group= defaults keep the world group of import time. If
# DDP imported it later, they would keep the group's gloo threads alive into exit, where they abort the rank.
import torch.distributed.nn  # noqa: F401
from torch.nn.parallel import DistributedDataParallel as DDP

from model import GPT, H100_BF16_PEAK_FLOPS, GPTConfig
from posenc.checkpoint import FORMAT_VERSION, CheckpointError, rng_state, save_checkpoint, set_rng_state
from posenc.cli import Interrupted, TrainingError, cli
from posenc.config import ConfigError, at_least, check_fields, config_file, flat_keys, from_dict, parse, to_dict
from posenc.data import BatchSampler, data_identity
from posenc.metrics import WANDB_PROJECT, MetricsLog, start_wandb
from posenc.pose import PoSEPositions
from posenc.resume import build_model
from posenc.run_folder import claim, clear, write_atomic
from posenc.runtime import autocast, resolve_compile, resolve_device, resolve_dtype


@dataclass
class TrainConfig:
    out_dir: str = "out/{config}_{pos_encoding}"  # {config}: the TOML file's name ("run" without one), {key}: its value
    data_dir: str = "data/stdlib"
    seed: int = 1337
    device: str = "auto"  # auto: cuda, else mps, else cpu
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 autocast where native (runtime.resolve_dtype)
    compile: Literal["auto", True, False] = "auto"  # torch.compile for training; auto: runs long enough to repay it
    batch_size: int = 16  # sequences per micro-step (per GPU)
    grad_accum_steps: int = 1  # micro-steps per optimizer step
    max_iters: int = 500  # optimizer steps
    learning_rate: float = 1e-3
    min_lr: float = 1e-4  # cosine decay ends here
    warmup_iters: int = 50  # linear warmup steps
    lr_decay_iters: int | None = None  # None: max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    eval_interval: int = 100  # steps between validation losses (0: only at the end)
    eval_iters: int = 20  # validation batches per evaluation
    log_interval: int = 10  # steps between train log lines
    ckpt_interval: int = 100  # steps between checkpoints (0: only the final one, always written)
    wandb: Literal["off", "offline", "online"] = "off"  # offline: no account, no network
    wandb_project: str = WANDB_PROJECT
    wandb_group: str = ""  # runs of one sweep share a group (scripts/sweep.py sets it)
    run_name: str = ""  # "": the basename of out_dir
    resume: bool = False  # continue the run in out_dir exactly; its saved settings are the defaults
    overwrite: bool = False  # replace the run in out_dir (a fresh run refuses a folder that holds one)
    init_from: str = "scratch"  # scratch | path of a checkpoint whose weights start this run
    min_doc_len: int = 0  # >0: train only on windows inside documents at least this long
    pose_window: int = 0  # >0: PoSE (posenc/pose.py): train on windows this long, position ids skip-wise below block_size
    pose_chunks: int = 2  # PoSE: chunks per window, each shifted by its own skip
    peak_flops: float = H100_BF16_PEAK_FLOPS  # for MFU
    model: GPTConfig = field(default_factory=GPTConfig)

    def __post_init__(self):
        check_fields(self)
        at_least(self, 1, "batch_size", "grad_accum_steps", "eval_iters", "log_interval", "peak_flops")
        at_least(self, 0, "max_iters", "warmup_iters", "lr_decay_iters", "eval_interval", "ckpt_interval",
                 "min_doc_len", "learning_rate", "min_lr", "weight_decay", "grad_clip", "pose_window")
        at_least(self, 1, "pose_chunks")
        if self.pose_window and self.model.pos_encoding != "rope":
            raise ConfigError(f"pose_window: PoSE shifts RoPE position ids; this model has {self.model.pos_encoding!r} "
                              "positions")
        if self.pose_window > self.model.block_size:
            raise ConfigError(f"pose_window={self.pose_window} is longer than block_size={self.model.block_size}: PoSE "
                              "trains on windows shorter than the positions it reaches")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"beta1={self.beta1} and beta2={self.beta2} must lie in [0, 1)")


SPIKE = 10.0  # a loss this many times the mean of the recent steps' is a divergence: stop, keep the checkpoint
RECENT = 20  # steps in that mean


def load_config(argv=None) -> TrainConfig:
    """TrainConfig from the command line; out_dir's {config} is the config file's name. With --resume=true the
    run's saved settings (out_dir/config.json) are the defaults, and the flags given change them."""
    argv = sys.argv[1:] if argv is None else argv
    file = config_file(TrainConfig, argv)
    name = Path(file).stem if file else "run"
    cfg = with_out_dir(parse(TrainConfig, argv, doc=__doc__), name)
    saved = Path(cfg.out_dir) / "config.json"
    if cfg.resume and saved.is_file():  # the device is this machine's choice, not the run's
        defaults = from_dict(TrainConfig, json.loads(saved.read_text())["config"] | {"device": TrainConfig.device})
        cfg = with_out_dir(parse(TrainConfig, argv, defaults=defaults), name)
    return cfg


def with_out_dir(cfg: TrainConfig, config_name: str = "run") -> TrainConfig:
    """out_dir with its {key} placeholders filled in (any flat config key, and {config})."""
    values = {k: getattr(cfg.model if k in flat_keys(GPTConfig) else cfg, k)
              for k in flat_keys(TrainConfig) if "." not in k}
    try:
        out_dir = cfg.out_dir.format(config=config_name, **values)
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"bad value {cfg.out_dir!r} for config key 'out_dir': no config key {e}") from None
    return dataclasses.replace(cfg, out_dir=out_dir)


def resolve(cfg: TrainConfig, log=print) -> TrainConfig:
    """Fill in out_dir, device, dtype and compile for this machine; say why dtype and compile are what they are
    (config.json keeps the resolved values, so a resumed run keeps them)."""
    device = resolve_device(cfg.device)
    dtype, why_dtype = resolve_dtype(cfg.dtype, device)
    compile, why_compile = resolve_compile(cfg.compile, device, cfg.max_iters)
    if (cfg.dtype, cfg.compile) != (dtype, compile):
        log(f"dtype={dtype} ({why_dtype}); compile={str(compile).lower()} ({why_compile})")
    return dataclasses.replace(with_out_dir(cfg), device=device, dtype=dtype, compile=compile)


def get_lr(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to learning_rate, then cosine decay to min_lr at lr_decay_iters."""
    decay_iters = cfg.max_iters if cfg.lr_decay_iters is None else cfg.lr_decay_iters
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1)
    if step >= decay_iters:
        return cfg.min_lr
    ratio = (step - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


@torch.no_grad()
def estimate_loss(model, sampler, start_state, eval_iters, mixed_precision, device) -> torch.Tensor:
    """Mean loss over the same eval_iters validation batches every time (the sampler is rewound)."""
    sampler.load_state_dict(start_state)
    model.eval()
    total = torch.zeros((), device=device)
    for _ in range(eval_iters):
        x, y = sampler.next()
        with mixed_precision:
            _, loss = model(x, y)
        total += loss.float()
    model.train()
    return total / eval_iters


class StopOnInterrupt:
    """The first Ctrl-C (or SIGTERM) asks the loop to stop at the next step and save; a second one aborts."""
    requested = 0.0  # when the first signal came (monotonic seconds); 0: none
    signum = signal.SIGTERM

    def __enter__(self):
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handler(self, signum, frame):
        # a second signal aborts, unless it comes within a second (`timeout` and torchrun may signal twice at once)
        if self.requested and time.monotonic() - self.requested > 1.0:
            raise Interrupted(signum, "aborted by a second signal; the last checkpoint is kept")
        if not self.requested:
            self.requested, self.signum = time.monotonic(), signum
            print("interrupted: stopping after this step and saving a checkpoint (again to abort)", file=sys.stderr)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


# ----------------------------------------------------------------------------- the steps of a run

@dataclass
class Run:
    """What the loop carries from step to step."""
    cfg: TrainConfig
    device: str
    rank: int
    world: int
    model: GPT  # the plain module: checkpoints, MFU
    step_model: torch.nn.Module  # compiled and/or DDP-wrapped: training steps
    eval_model: torch.nn.Module  # compiled, not DDP-wrapped: validation
    optimizer: torch.optim.Optimizer
    mixed_precision: object  # runtime.autocast of the run's dtype
    train_sampler: BatchSampler
    val_sampler: BatchSampler
    val_start: dict
    data: dict
    step: int = 0
    start_step: int = 0
    best_val: float = float("inf")
    val_loss: float | None = None
    val_step: int | None = None  # the step val_loss was measured at
    train_loss: float | None = None
    recent_losses: list = field(default_factory=list)  # the last RECENT train losses: what a spike is measured by
    tokens_per_sec: float | None = None
    mfu: float | None = None
    last_ckpt: str | None = None
    ckpt_step: int | None = None  # the step the checkpoint in out_dir holds (config.json says it too)
    info: dict = field(default_factory=dict)  # config.json's contents
    interrupted: int = 0  # the signal that asked to stop, 0: none
    step_times: list = field(default_factory=list)
    metrics: MetricsLog | None = None
    pose: PoSEPositions | None = None  # PoSE: the position ids of each training batch

    @property
    def master(self):
        return self.rank == 0

    @property
    def out_dir(self):
        return Path(self.cfg.out_dir)

    def log(self, *args, **kwargs):
        if self.master:
            print(*args, **kwargs)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def setup(cfg: TrainConfig, device: str, rank: int = 0, world: int = 1) -> Run:
    """Seeds, model, optimizer, samplers and run folder; a resumed run restores everything it saved."""
    device_type = device.split(":")[0]
    seed_everything(cfg.seed + rank)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    cfg, model, ckpt = build_model(cfg)
    data = data_identity(cfg.data_dir)
    if data.get("vocab_size") and cfg.model.vocab_size < data["vocab_size"]:
        raise ConfigError(f"bad value {cfg.model.vocab_size} for config key 'vocab_size': the data at {cfg.data_dir} "
                          f"has {data['vocab_size']} token ids; expected a number >= {data['vocab_size']}")
    model = model.to(device)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device_type)
    eval_model = torch.compile(model) if cfg.compile else model
    step_model = eval_model
    if world > 1:
        step_model = DDP(eval_model, device_ids=[int(device.split(":")[1])] if device_type == "cuda" else None)
    mixed_precision = autocast(device, cfg.dtype)
    T = cfg.model.block_size
    train_sampler = BatchSampler(cfg.data_dir, "train", cfg.batch_size, cfg.pose_window or T, cfg.seed, device,
                                 min_doc_len=cfg.min_doc_len or None, rank=rank, world_size=world)
    val_sampler = BatchSampler(cfg.data_dir, "val", cfg.batch_size, T, cfg.seed + 1, device, rank=rank, world_size=world)
    run = Run(cfg, device, rank, world, model, step_model, eval_model, optimizer, mixed_precision, train_sampler,
              val_sampler, val_sampler.state_dict(), data)
    if cfg.pose_window:
        run.pose = PoSEPositions(cfg.pose_window, T, cfg.pose_chunks, cfg.seed, rank)
    if ckpt is not None:
        restore(run, ckpt)
    if cfg.overwrite and not cfg.resume and run.master:  # every check passed: now the old run may go
        clear(run.out_dir)
    run.metrics = MetricsLog(run.out_dir, run.start_step if cfg.resume else None, enabled=run.master,
                             wandb_run=start_wandb(cfg.wandb, run.out_dir, cfg.run_name or run.out_dir.resolve().name,
                                                   to_dict(cfg), project=cfg.wandb_project, group=cfg.wandb_group)
                             if run.master else None)
    if run.master:
        run.info = {"config": to_dict(cfg), "data": run.data, "seed": cfg.seed, "torch": torch.__version__,
                    "world_size": world, "start_step": run.start_step, "n_params": model.num_params()}
        write_atomic(run.out_dir / "config.json", json.dumps(run.info | {"ckpt_step": run.ckpt_step}, indent=2) + "\n")
    return run


def restore(run: Run, ckpt: dict) -> None:
    """Step, optimizer, sampler and RNG state of a checkpoint: the run continues as if never stopped."""
    run.step = run.start_step = ckpt["step"]
    run.val_step = ckpt.get("val_step", run.step)  # an interrupt can skip the validation of the step it saves
    run.best_val = ckpt.get("best_val_loss", float("inf"))
    run.recent_losses = list(ckpt.get("recent_losses", []))
    run.last_ckpt, run.ckpt_step = str(run.out_dir / "ckpt.pt"), ckpt["step"]
    if ckpt.get("optimizer"):  # a training-free checkpoint (extend_context.py --steps=0) has none
        try:
            run.optimizer.load_state_dict(ckpt["optimizer"])
        except ValueError as e:  # groups of another size: written before position tables left the decayed group
            raise CheckpointError(f"cannot resume {run.last_ckpt}: its optimizer state does not fit this code's "
                                  f"parameter groups ({e}); resume it with the code that wrote it, or start a new run "
                                  f"from its weights with --init_from={run.last_ckpt}") from None
    if ckpt.get("sampler"):
        run.train_sampler.load_state_dict(ckpt["sampler"])  # the same for every rank: a seed and a batch count
    ranks = ckpt.get("ranks") or [{"rng": ckpt.get("rng")}]
    if len(ranks) == run.world and ranks[run.rank]["rng"]:
        set_rng_state(ranks[run.rank]["rng"])
    else:
        run.log(f"warning: the checkpoint has no RNG state for {run.world} process(es): dropout restarts from the seed")


def _every(step: int, interval: int) -> bool:
    return interval > 0 and step % interval == 0


def validate(run: Run) -> float:
    """Validation loss on the same batches every time (averaged over ranks), recorded."""
    val = estimate_loss(run.eval_model, run.val_sampler, run.val_start, run.cfg.eval_iters, run.mixed_precision, run.device)
    if run.world > 1:
        dist.all_reduce(val)
    run.val_loss, run.val_step = val.item() / run.world, run.step
    run.best_val = min(run.best_val, run.val_loss)
    run.log(f"step {run.step} | val loss {run.val_loss:.4f}")
    run.metrics.record(kind="val", step=run.step, loss=run.val_loss)
    return run.val_loss


def spike(run: Run, loss: float) -> str | None:
    """Why `loss` means the run diverged (non-finite, or SPIKE times the recent mean), or None."""
    if not math.isfinite(loss):
        return f"non-finite loss ({loss})"
    recent = sum(run.recent_losses) / len(run.recent_losses) if run.recent_losses else None
    if recent is not None and loss > SPIKE * recent:
        return f"loss {loss:.4g}, {loss / recent:.0f}x the mean of the last {len(run.recent_losses)} steps ({recent:.4g})"
    return None


def check_weights(run: Run) -> None:
    """The weights about to be saved must have a sane loss: the validation loss if it was just measured, else
    one validation batch. A diverged model never replaces a good checkpoint."""
    loss = run.val_loss if run.val_step == run.step else None
    if loss is None:
        val = estimate_loss(run.eval_model, run.val_sampler, run.val_start, 1, run.mixed_precision, run.device)
        if run.world > 1:
            dist.all_reduce(val)
        loss = val.item() / run.world
    why = spike(run, loss)
    if why:
        raise TrainingError(f"the weights at step {run.step} have a {why}: not saved; the last checkpoint "
                            f"({run.last_ckpt or 'none'}) is kept. Lower the learning_rate or resume from it")


def save(run: Run) -> str | None:
    """Checkpoint everything a resumed run needs, atomically, once the weights' loss is checked. A save that
    fails (a full disk) stops the run, on every rank, with TrainingError: the previous checkpoint is kept, and
    metrics.jsonl and config.json say which step it holds. Training on would only report steps that no file has."""
    check_weights(run)
    ranks = [{"rng": rng_state()}] * run.world
    if run.world > 1:  # each rank's own RNG (dropout); the sampler state is the same on every rank
        dist.all_gather_object(ranks, ranks[0])
    error = None
    if run.master:
        ckpt = {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(), "step": run.step,
                "config": to_dict(run.cfg), "rng": ranks[0]["rng"], "sampler": run.train_sampler.state_dict(),
                "data": run.data, "best_val_loss": run.best_val, "recent_losses": run.recent_losses,
                "val_step": run.val_step, "format_version": FORMAT_VERSION}
        if run.world > 1:
            ckpt["ranks"] = ranks
        try:
            run.last_ckpt, run.ckpt_step = save_checkpoint(ckpt, run.out_dir / "ckpt.pt"), run.step
        except CheckpointError as e:
            error = f"could not save checkpoint {run.out_dir / 'ckpt.pt'} at step {run.step}: {e.reason}"
        error = record_checkpoint(run, error)
    if run.world > 1:  # rank 0 alone writes; every rank stops with it
        shared = [error, run.ckpt_step]
        dist.broadcast_object_list(shared, src=0)
        error, run.ckpt_step = shared
    if error:
        kept = "no checkpoint is kept" if run.ckpt_step is None else f"the checkpoint of step {run.ckpt_step} is kept"
        raise TrainingError(f"{error}; the run stops here and {kept}: make room, then continue with --resume=true")
    return run.last_ckpt if run.master else None


def record_checkpoint(run: Run, error: str | None) -> str | None:
    """metrics.jsonl and config.json say which step the checkpoint holds (and, after a failed save, which step
    could not be saved); returns the error, or why the records could not be written either."""
    try:
        if error:
            run.metrics.record(kind="ckpt_failed", step=run.step, kept_step=run.ckpt_step)
        else:
            run.metrics.record(kind="ckpt", step=run.step)
        write_atomic(run.out_dir / "config.json", json.dumps(run.info | {"ckpt_step": run.ckpt_step}, indent=2) + "\n")
    except OSError as e:
        return error or f"could not record the checkpoint of step {run.step}: {e}"
    return error


def train_step(run: Run, stop: StopOnInterrupt | None = None) -> float:
    """One optimizer step over grad_accum_steps micro-batches; returns the mean loss. Every rank learns of a
    stop request (a signal until now) here, so all stop at the same step. A non-finite loss or a spike stops
    before the optimizer step."""
    cfg, model = run.cfg, run.step_model
    lr = get_lr(run.step, cfg)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    t0 = time.perf_counter()
    loss_sum = torch.zeros((), device=run.device)
    for micro in range(cfg.grad_accum_steps):
        x, y = run.train_sampler.next()
        pos = run.pose.draw(x.size(0), run.train_sampler.step, x.device) if run.pose else None
        sync = model.no_sync() if run.world > 1 and micro < cfg.grad_accum_steps - 1 else nullcontext()
        with sync:  # DDP all-reduces gradients on the last micro-step only
            with run.mixed_precision:
                _, loss = model(x, y, pos=pos)
            (loss / cfg.grad_accum_steps).backward()
        loss_sum += loss.detach().float()
    stop_flag = torch.tensor(float(stop is not None and stop.requested > 0), device=run.device)
    stats = torch.stack([loss_sum / cfg.grad_accum_steps, stop_flag])
    if run.world > 1:
        dist.all_reduce(stats)
    run.train_loss = stats[0].item() / run.world
    if stats[1].item() > 0:
        run.interrupted = stop.signum if stop is not None and stop.requested else signal.SIGTERM
    why = spike(run, run.train_loss)
    if why:
        raise TrainingError(f"{why} at step {run.step + 1}: stopped before the optimizer step; the last checkpoint "
                            f"({run.last_ckpt or 'none'}) is kept. Lower the learning_rate or resume from it")
    run.recent_losses = (run.recent_losses + [run.train_loss])[-RECENT:]
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    dt = time.perf_counter() - t0  # the loss .item() above waited for the GPU
    if run.step > run.start_step + 1:  # the first step pays for compilation
        run.step_times.append(dt)
    log_step(run, lr, dt)
    return run.train_loss


def log_step(run: Run, lr: float, dt: float) -> None:
    """Every log_interval steps: loss, throughput and MFU over the steps since the last line."""
    cfg = run.cfg
    if not (_every(run.step, cfg.log_interval) or run.step == cfg.max_iters):
        return
    times = run.step_times or [dt]
    T = cfg.pose_window or cfg.model.block_size  # tokens per sequence trained (PoSE: its window)
    run.tokens_per_sec = cfg.batch_size * T * cfg.grad_accum_steps * run.world * len(times) / sum(times)
    run.mfu = run.model.estimate_mfu(run.tokens_per_sec / run.world, T, cfg.peak_flops)
    ms = 1000 * sum(times) / len(times)
    run.log(f"step {run.step} | loss {run.train_loss:.4f} | lr {lr:.2e} | {run.tokens_per_sec:,.0f} tok/s | "
            f"mfu {100 * run.mfu:.2f}% | {ms:.1f} ms/step")
    run.metrics.record(kind="train", step=run.step, loss=run.train_loss, lr=lr, tokens_per_sec=run.tokens_per_sec,
                       mfu=run.mfu, ms_per_step=ms)
    run.step_times = []


def main(cfg: TrainConfig | list[str] | None = None) -> dict:
    """Train (cfg: a TrainConfig, or command-line arguments); returns the final metrics and the last checkpoint.
    An interrupt saves a checkpoint, then raises config.Interrupted: the run is not finished."""
    if not isinstance(cfg, TrainConfig):
        cfg = load_config(cfg)
    rank, world, local_rank = (int(os.environ.get(k, 0)) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))  # torchrun's
    ddp, world = world > 1, max(world, 1)
    cfg = resolve(cfg, log=print if rank == 0 else lambda *a: None)
    device = cfg.device
    owner = claim(cfg.out_dir, cfg.resume, cfg.overwrite) if rank == 0 else nullcontext()
    with owner:
        if ddp:
            if device.startswith("cuda"):
                device = f"cuda:{local_rank}"
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        try:
            return loop(setup(cfg, device, rank, world))
        finally:
            if ddp:
                dist.destroy_process_group()


def loop(run: Run) -> dict:
    """Evaluate, checkpoint and step until max_iters or an interrupt (which saves, then raises Interrupted)."""
    cfg = run.cfg
    run.log(f"{cfg.model.pos_encoding}: {run.model.num_params() / 1e6:.2f}M parameters, T={cfg.model.block_size}, "
            f"device={run.device}, dtype={cfg.dtype}, world={run.world}, steps {run.start_step}->{cfg.max_iters}")
    try:
        with StopOnInterrupt() as stop:
            while True:
                last = run.step >= cfg.max_iters
                if (not run.interrupted and (last or _every(run.step, cfg.eval_interval))
                        and run.val_step != run.step):  # a resumed run evaluates a step an interrupt skipped
                    validate(run)
                if run.step > run.start_step and (last or run.interrupted or _every(run.step, cfg.ckpt_interval)):
                    save(run)
                if last or run.interrupted:
                    break
                train_step(run, stop)
    finally:
        run.metrics.close()
    if run.interrupted:
        raise Interrupted(run.interrupted, f"checkpoint at step {run.step} in {run.out_dir}; continue with "
                                           "--resume=true")
    return {"step": run.step, "train_loss": run.train_loss, "val_loss": run.val_loss, "best_val_loss": run.best_val,
            "tokens_per_sec": run.tokens_per_sec, "mfu": run.mfu, "ckpt": run.last_ckpt, "out_dir": str(run.out_dir)}


if __name__ == "__main__":
    cli(main, errors=(ValueError, OSError, TrainingError))
