"""The wall and the rescue, end to end, in one command.

    python reproduce.py                  # CPU scale: base 256 -> x4 and x8, a few minutes on 2 cores, offline
    python reproduce.py --scale gpu      # GPU scale: base 4096 -> 16k and 32k, the ~30M model on one GPU

Stages: prepare data -> train every position scheme at the base length -> extend RoPE (PI and YaRN
fine-tuned; PI, NTK, dynamic NTK and YaRN training-free) -> evaluate everything past the base length ->
report.md with plots and tables in the run folder. Finished stages are recorded in stages.json and skipped
on a re-run; an interrupted training stage resumes from its checkpoint, an interrupted evaluation from the
last model it finished.
"""

import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

import evaluate
import extend_context
import train
from config import check_fields, cli, parse
from data.loader import load_meta
from data.prepare import prepare
from positions import SCHEMES
from rope_scaling import ROPE_SCALING, scaling_dict
from run_folder import holds_run


@dataclass
class ReproduceConfig:
    scale: Literal["cpu", "gpu"] = "cpu"  # cpu: base 256, minutes on 2 cores; gpu: base 4096, one GPU
    out_dir: str = ""  # "": runs/<scale>

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class Scale:
    """Everything that differs between the two scales; the code is the same."""
    config: str  # configs/<config>.toml, trained once per scheme with --pos_encoding
    data_dir: str  # prepared from `source` (data/prepare.py) unless it already holds meta.json
    vocab_size: int | None  # compact vocabulary (data/prepare.py --vocab_size), None = GPT-2's 50257
    base_len: int
    factor: int = 4  # fine-tuned extensions go to factor * base_len
    eval_factor: int = 8  # evaluation goes to eval_factor * base_len
    train: dict = field(default_factory=dict)  # overrides of the configs, e.g. max_iters
    extend_steps: int = 100
    extend: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)  # evaluate.EvalConfig fields
    source: str = "stdlib"


SCALES = {
    "cpu": Scale("cpu", "data/stdlib8k", 8192, 256, extend_steps=250,
                 train={"max_iters": 500, "eval_interval": 250, "ckpt_interval": 250, "log_interval": 50},
                 extend={"learning_rate": 1e-3, "eval_interval": 125, "eval_iters": 4},
                 eval=dict(n_docs=12, passkey_trials=2, recall_trials=12)),
    "gpu": Scale("gpu30m", "data/stdlib", None, 4096, extend_steps=100,
                 extend={"learning_rate": 2e-4, "eval_interval": 50, "eval_iters": 4, "compile": True},
                 eval=dict(n_docs=8, passkey_trials=2, recall_trials=8)),
}
EXTENDED = "rope"  # the scheme whose context is extended
TRAINING_FREE = ("linear", "ntk", "dynamic", "yarn")  # rope_types evaluated with no fine-tuning
FINE_TUNED = ("linear", "yarn")  # rope_types fine-tuned at factor * base_len


class Stages:
    """stages.json: which stages finished and how long they took."""

    def __init__(self, run_dir):
        self.path = Path(run_dir) / "stages.json"
        self.done = json.loads(self.path.read_text()) if self.path.exists() else {}

    def run(self, name, fn):
        if name in self.done:
            print(f"== {name}: done in an earlier run ({self.done[name]['seconds']:.0f}s), skipped", flush=True)
            return self.done[name].get("result")
        print(f"== {name}", flush=True)
        t0 = time.time()
        result = fn()
        self.done[name] = {"seconds": time.time() - t0, "result": result}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.done, indent=1))
        tmp.replace(self.path)  # atomic: a crash never leaves a half-written record
        return result


def train_scheme(scale, scheme, run_dir):
    out_dir = Path(run_dir) / scheme
    flags = [f"configs/{scale.config}.toml", f"--pos_encoding={scheme}", f"--out_dir={out_dir}",
             f"--data_dir={scale.data_dir}", *(f"--{k}={v}" for k, v in scale.train.items())]
    if scale.vocab_size:
        flags.append(f"--vocab_size={scale.vocab_size}")
    if holds_run(out_dir):
        flags.append("--resume=true")  # an interrupted run continues as if never stopped
    result = train.main(train.load_config(flags))
    return {"ckpt": str(result["ckpt"]), "val_loss": result.get("val_loss")}


def fine_tune(scale, method, run_dir):
    out_dir = Path(run_dir) / f"{EXTENDED}_{method}_ft"
    extra = {"resume": True} if holds_run(out_dir) else {}
    ext = extend_context.ExtendConfig(ckpt=str(Path(run_dir) / EXTENDED / "ckpt.pt"), method=method,
                                      factor=scale.factor, steps=scale.extend_steps, out_dir=str(out_dir))
    return {"ckpt": str(extend_context.extend(ext, {**scale.extend, **extra}))}


def models_to_evaluate(scale, run_dir):
    """label -> checkpoint, or (checkpoint, rope_scaling) for a training-free scaling of the RoPE model."""
    run_dir = Path(run_dir)
    models = {scheme: run_dir / scheme / "ckpt.pt" for scheme in SCHEMES}
    for method in TRAINING_FREE:
        scaling = scaling_dict(method, scale.factor, scale.base_len)
        models[f"{EXTENDED} + {ROPE_SCALING[method].label} (no fine-tune)"] = (models[EXTENDED], scaling)
    for method in FINE_TUNED:
        models[f"{EXTENDED} + {ROPE_SCALING[method].label} fine-tuned"] = run_dir / f"{EXTENDED}_{method}_ft" / "ckpt.pt"
    return {k: (str(v[0]), v[1]) if isinstance(v, tuple) else str(v) for k, v in models.items()}


def write_report(scale, run_dir, stages, command):
    """report.md: what ran, on what, how long, then the evaluation's tables and plots."""
    run_dir = Path(run_dir)
    eval_dir = run_dir / "eval"
    summary = (eval_dir / "summary.md").read_text()
    meta = load_meta(scale.data_dir)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    timing = "\n".join(f"| {name} | {s['seconds']:.0f} |" for name, s in stages.done.items())
    total = sum(s["seconds"] for s in stages.done.values())
    lines = [
        f"# The wall and the rescue (configs/{scale.config}.toml)", "",
        f"Command: `{command}`  ",
        f"Machine: {platform.node() or 'unknown'}, {platform.processor() or platform.machine()}, {device}; "
        f"torch {torch.__version__}, Python {platform.python_version()}.  ",
        f"Data: {scale.data_dir} ({meta['source'].get('kind')}, {sum(meta['tokens'].values()):,} tokens, "
        f"vocabulary {meta['vocab_size']}); base length L = {scale.base_len}, fine-tuned extensions to "
        f"{scale.factor}L, evaluation to {scale.eval_factor}L.", "",
        "| stage | seconds |", "|---|---|", timing, f"| total | {total:.0f} |", "",
        *observations(json.loads((eval_dir / "results.json").read_text())), "",
        summary.replace("](", "](eval/").replace("# Long-context evaluation", "## Evaluation", 1),
    ]
    (run_dir / "report.md").write_text("\n".join(lines))
    print(f"wrote {run_dir / 'report.md'}")


def observations(results):
    """Plain sentences computed from the numbers: loss within L versus loss at the longest positions."""
    L, out = results["base_len"], ["## What the numbers say", ""]
    for label, r in results["models"].items():
        buckets = r.get("position", {}).get("buckets", [])
        inside = [b for b in buckets if b["hi"] <= L and "mean" in b]
        last = buckets[-1] if buckets else None
        if not inside or last is None:
            continue
        if "cannot_run" in last:
            out.append(f"- **{label}**: cannot run past {r['position']['evaluated_len']} tokens "
                       f"({last['cannot_run'].split(';')[0]}).")
            continue
        near = sum(b["mean"] for b in inside[-2:]) / len(inside[-2:])  # the positions just before L
        out.append(f"- **{label}**: loss {near:.2f} just before L, {last['mean']:.2f} at positions "
                   f"[{last['lo']}, {last['hi']}) ({last['mean'] - near:+.2f}).")
    return out


def run(scale, run_dir, command="python reproduce.py"):
    """Every stage of the experiment at one scale; finished stages are skipped."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    stages = Stages(run_dir)
    if not (Path(scale.data_dir) / "meta.json").exists():
        stages.done.pop("data", None)
    stages.run("data", lambda: prepare(scale.source, scale.data_dir, vocab_size=scale.vocab_size)["tokens"])
    for scheme in SCHEMES:
        stages.run(f"train {scheme}", lambda s=scheme: train_scheme(scale, s, run_dir))
    for method in FINE_TUNED:
        stages.run(f"fine-tune {EXTENDED} with {ROPE_SCALING[method].label}", lambda m=method: fine_tune(scale, m, run_dir))
    eval_cfg = evaluate.EvalConfig(data_dir=scale.data_dir, max_len=scale.eval_factor * scale.base_len,
                                   out_dir=str(run_dir / "eval"), base_len=scale.base_len, resume=True, **scale.eval)
    stages.run("evaluate", lambda: evaluate.evaluate(models_to_evaluate(scale, run_dir), eval_cfg) and None)
    write_report(scale, run_dir, stages, command)
    return run_dir / "report.md"


def main(argv=None):
    cfg = parse(ReproduceConfig, argv, doc=__doc__)
    command = " ".join(["python reproduce.py", *(argv if argv is not None else [])])
    return run(SCALES[cfg.scale], Path(cfg.out_dir or f"runs/{cfg.scale}"), command)


if __name__ == "__main__":
    cli(lambda argv: main(argv) and None, errors=(ValueError, OSError, train.TrainingError))
