"""The decoding paths against the reference on trained models: passkey, recall and greedy tokens.

    python -m scripts.check_decoding --ckpt=runs/cpu/seed1337/rope/ckpt.pt,runs/cpu/seed1337/alibi/ckpt.pt \
        --data_dir=data/stdlib4k --max_len=2048

Every checkpoint runs the passkey and recall tasks of evaluate.py (the same prompts and probes) and greedy
continuations of held-out text, in each decoding mode:
  reference     fp32 weights, the KV cache's forward at every new token: the path before the static step;
  static fp32   fp32 weights, model.decode_step (static shapes; generation.generate's default);
  bf16 weights  the static step on weights cast to bf16 once, what sample.py's --dtype=auto gives on a CPU or GPU
                with native bf16;
  bf16 autocast the static step on fp32 weights under bf16 autocast, what evaluate.py's --dtype=auto runs.
The bf16 modes run only where the device computes bf16 natively (runtime.resolve_dtype). Recall scores one
forward (no decoding), so it changes with the dtype alone. Prints one table; asserts nothing (a test, 
tests/test_kv_cache.py, holds the static step to the full forward).
"""
import copy
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

import evaluate
from posenc.cli import cli
from posenc.config import parse
from posenc.eval_tasks import passkey_accuracy, recall_by_distance
from posenc.generation import generate, to_inference_dtype
from posenc.runtime import autocast, resolve_device, resolve_dtype


@dataclass
class CheckConfig:
    ckpt: tuple[str, ...] = ()  # checkpoints, comma-separated
    data_dir: str = "data/stdlib4k"
    max_len: int = 2048  # passkey lengths L, 2L, 4L, 8L up to this; recall distances up to it
    passkey_trials: int = 2  # per length and depth (5 depths)
    recall_trials: int = 16  # probes per distance
    prompts: int = 16  # held-out prompts for greedy continuations
    new_tokens: int = 64  # greedy tokens after each prompt
    device: str = "auto"


# name -> (static step, weights' dtype, autocast dtype or None)
MODES = {"reference": (False, "float32", None), "static fp32": (True, "float32", None),
         "bf16 weights": (True, "bfloat16", None), "bf16 autocast": (True, "float32", "bfloat16")}


def greedy(model, prompts, new_tokens, static):
    """(P, new_tokens) greedy tokens after each prompt (1, T)."""
    return torch.cat([generate(model, p, new_tokens, temperature=0, static=static)[:, p.size(1):] for p in prompts])


def agreement(tokens, reference):
    """(continuations equal to the reference's, mean tokens before the first difference)."""
    same = tokens == reference
    first = torch.where(same.all(1), same.size(1), (~same).float().argmax(1))
    return int(same.all(1).sum()), first.float().mean().item()


def check(cfg):
    device = resolve_device(cfg.device)
    native = resolve_dtype("auto", device)[0] == "bfloat16"
    modes = {k: v for k, v in MODES.items() if native or (v[1], v[2]) == ("float32", None)}
    eval_cfg = evaluate.EvalConfig(data_dir=cfg.data_dir, max_len=cfg.max_len, tasks=("passkey", "recall"),
                                   passkey_trials=cfg.passkey_trials, recall_trials=cfg.recall_trials)
    models = evaluate.load_models(cfg.ckpt, device=device)
    base_len = min(evaluate.training_length(m) for m in models.values())
    data, _ = evaluate.eval_data(eval_cfg, base_len)
    starts = np.linspace(0, len(data.stream) - 2 * base_len - 1, cfg.prompts).astype(int)
    prompts = [torch.tensor(data.stream[s:s + 2 * base_len].astype(np.int64), device=device)[None] for s in starts]
    print(f"passkey at {', '.join(map(str, data.lengths))} tokens ({cfg.passkey_trials} trials x 5 depths each); "
          f"recall: {cfg.recall_trials} probes at each of {len(data.distances)} distances; greedy: {cfg.prompts} "
          f"prompts of {2 * base_len} held-out tokens, {cfg.new_tokens} new tokens each\n")
    print("| model | mode | passkey accuracy by length | recall: second-copy loss, accuracy (means over distances) "
          "| greedy continuations equal to the reference's | tokens before the first difference (mean) |")
    print("|---|---|---|---|---|---|")
    for label, fp32 in models.items():
        reference = None
        for mode, (static, weights, amp) in modes.items():
            model = fp32 if weights == "float32" else to_inference_dtype(copy.deepcopy(fp32), weights)
            with autocast(device, amp) if amp else nullcontext():
                passkey = passkey_accuracy(model, data.tokenizer, data.lengths, data.passkey_depths,
                                           data.passkey_trials, data.seed, static=static)
                recall = recall_by_distance(model, data.stream, data.distances, data.span_len, data.recall_trials,
                                            data.prefix_len, data.seed)
                tokens = greedy(model, prompts, cfg.new_tokens, static)
            reference = tokens if reference is None else reference
            equal, before = agreement(tokens, reference)
            rows = [r for r in recall["by_distance"] if "accuracy" in r]
            acc = " / ".join(f"{r['accuracy']:.2f}" if "accuracy" in r else "—" for r in passkey["by_length"])
            recall_text = f"{np.mean([r['loss'] for r in rows]):.4f}, {np.mean([r['accuracy'] for r in rows]):.3f}"
            print(f"| {label} | {mode} | {acc} | {recall_text} | {equal}/{len(prompts)} | {before:.1f} |", flush=True)


def main(argv=None):
    cfg = parse(CheckConfig, argv, doc=__doc__)
    if not cfg.ckpt:
        raise ValueError("missing --ckpt: give checkpoints, comma-separated")
    check(cfg)


if __name__ == "__main__":
    cli(main)
