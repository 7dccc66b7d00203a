"""The wall and the rescue, end to end, in one command.

    python reproduce.py                  # CPU scale: base 256 -> x4 and x8, a few minutes on 2 cores, offline
    python reproduce.py --scale gpu      # GPU scale: base 4096 -> 16k and 32k, the ~30M model on one GPU
    python reproduce.py --seeds=3        # every model trained with 3 seeds: mean ± std, and which differences
                                         # exceed the seed spread

Stages: prepare data -> train every position scheme at the base length -> extend RoPE (PI and YaRN
fine-tuned; PI, NTK, dynamic NTK and YaRN training-free) -> evaluate everything past the base length ->
report.md with plots and tables in the run folder; each seed's runs in <out_dir>/seed<N>/, the merged
evaluation in <out_dir>/eval/. Finished stages are recorded in stages.json and skipped on a re-run (more
seeds later only add the new ones); an interrupted (exit 130 or 143) training stage resumes from its
checkpoint, an interrupted evaluation from the last model it finished. Training runs as jobs (jobs.py): with
the default --workers=0, one per GPU or two at once on a CPU, the RoPE fine-tunes as soon as RoPE is trained.
"""

import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

import evaluate
import train
from config import at_least, check_fields, cli, parse
from data.loader import load_meta
from data.prepare import prepare
from plots import seeds
from positions import SCHEMES
from rope_scaling import ROPE_SCALING, scaling_dict
from run_folder import holds_run, write_atomic
from jobs import Job, run_jobs
from sweep import compute, differs, merge_seeds

ROOT = Path(__file__).resolve().parent


@dataclass
class ReproduceConfig:
    scale: Literal["cpu", "gpu"] = "cpu"  # cpu: base 256, minutes on 2 cores; gpu: base 4096, one GPU
    out_dir: str = ""  # "": runs/<scale>
    seeds: int = 1  # train every model with seeds 1337, 1338, ...: the tables give mean ± std over them
    workers: int = 0  # training runs at once (sweep.run_jobs); 0: one per visible GPU, or 2 on a CPU, 1: in this process
    reference: str = ""  # loss by position is also shown minus this model's; "": the first fine-tuned one

    def __post_init__(self):
        check_fields(self)
        at_least(self, 1, "seeds")
        at_least(self, 0, "workers")


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
    "cpu": Scale("cpu", "data/stdlib4k", 4096, 256, extend_steps=150,
                 train={"max_iters": 350, "eval_interval": 175, "ckpt_interval": 175, "log_interval": 50},
                 extend={"learning_rate": 1e-3, "eval_interval": 75, "eval_iters": 4},
                 eval=dict(n_docs=8, passkey_trials=1, recall_trials=8)),
    "gpu": Scale("gpu30m", "data/stdlib", None, 4096, extend_steps=100,
                 extend={"learning_rate": 2e-4, "eval_interval": 50, "eval_iters": 4, "compile": True},
                 eval=dict(n_docs=8, passkey_trials=2, recall_trials=8)),
}
EXTENDED = "rope"  # the scheme whose context is extended
TRAINING_FREE = ("linear", "ntk", "dynamic", "yarn")  # rope_types evaluated with no fine-tuning
FINE_TUNED = ("linear", "yarn")  # rope_types fine-tuned at factor * base_len


class Stages:
    """stages.json: which stages finished, how long they took, and what they returned."""

    def __init__(self, run_dir):
        self.path = Path(run_dir) / "stages.json"
        self.done = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.skipped = []  # stages this run found finished

    def finish(self, name, seconds, result=None):
        self.done[name] = {"seconds": seconds, "result": result}
        write_atomic(self.path, json.dumps(self.done, indent=1))  # a crash never leaves a half-written record

    def skip(self, name):
        if name in self.done:
            print(f"== {name}: done in an earlier run ({self.done[name]['seconds']:.0f}s), skipped", flush=True)
            self.skipped.append(name)
        return name in self.done

    def run(self, name, fn):
        """Run fn as a stage, unless it finished before. An exception (an interrupt) records nothing."""
        if self.skip(name):
            return self.done[name].get("result")
        print(f"== {name}", flush=True)
        t0 = time.time()
        result = fn()
        self.finish(name, time.time() - t0, result)
        return result

    def run_jobs(self, jobs, workers=1):
        """Stages that are command lines (jobs.Job, whose name is the stage's and whose on_done is given the
        run folder it trains), several at once with workers; each records the compute of the run it trained.
        A failure stops the pipeline."""
        todo = []
        for job, out_dir in jobs:
            if not self.skip(job.name):
                print(f"== {job.name}", flush=True)
                job.on_done = lambda seconds, n=job.name, d=out_dir: self.finish(n, seconds, compute(d))
                job.after = tuple(n for n in job.after if n not in self.done)
                todo.append(job)
        failed = run_jobs(todo, workers)
        if failed:
            raise train.TrainingError(f"stage(s) failed: {', '.join(failed)} (see the errors above); fix the cause "
                                      "and run the same command again: finished stages are skipped")


def seed_dir(run_dir, seed):
    return Path(run_dir) / f"seed{seed}"


def train_stage(scale, scheme, seed, run_dir):
    out_dir = seed_dir(run_dir, seed) / scheme
    argv = [str(ROOT / "configs" / f"{scale.config}.toml"), f"--pos_encoding={scheme}", f"--seed={seed}",
            f"--out_dir={out_dir}", f"--data_dir={scale.data_dir}", *(f"--{k}={v}" for k, v in scale.train.items())]
    if scale.vocab_size:
        argv.append(f"--vocab_size={scale.vocab_size}")
    if holds_run(out_dir):
        argv.append("--resume=true")  # an interrupted run continues as if never stopped
    return Job(train_name(scheme, seed), [("train.py", argv)]), out_dir


def train_name(scheme, seed):
    return f"train {scheme} (seed {seed})"


def fine_tune_stage(scale, method, seed, run_dir):
    base, out_dir = seed_dir(run_dir, seed) / EXTENDED, seed_dir(run_dir, seed) / f"{EXTENDED}_{method}_ft"
    argv = [f"--ckpt={base / 'ckpt.pt'}", f"--method={method}", f"--factor={scale.factor}",
            f"--steps={scale.extend_steps}", f"--out_dir={out_dir}", *(f"--{k}={v}" for k, v in scale.extend.items())]
    if holds_run(out_dir):
        argv.append("--resume=true")
    return Job(f"fine-tune {EXTENDED} with {ROPE_SCALING[method].label} (seed {seed})", [("extend_context.py", argv)],
               after=(train_name(EXTENDED, seed),)), out_dir


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


def write_report(scale, run_dir, stages, command, results, wall=None):
    """report.md: what ran, on what, with how much compute and time, then the evaluation's tables and plots."""
    run_dir = Path(run_dir)
    summary = (run_dir / "eval" / "summary.md").read_text()
    meta = load_meta(scale.data_dir)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    total = sum(s["seconds"] for s in stages.done.values())
    timing = []
    for name, s in stages.done.items():
        c = s.get("result") if isinstance(s.get("result"), dict) and "steps" in s["result"] else {}
        timing.append(f"| {name} | {s['seconds']:.0f} | {c.get('steps', '')} | "
                      f"{format(c['tokens'], ',') if 'tokens' in c else ''} |")
    lines = [
        f"# The wall and the rescue (configs/{scale.config}.toml)", "",
        f"Command: `{command}`  ",
        f"Machine: {platform.node() or 'unknown'}, {platform.processor() or platform.machine()}, {device}; "
        f"torch {torch.__version__}, Python {platform.python_version()}.  ",
        f"Data: {scale.data_dir} ({meta['source'].get('kind')}, {sum(meta['tokens'].values()):,} tokens, "
        f"vocabulary {meta['vocab_size']}); base length L = {scale.base_len}, fine-tuned extensions to "
        f"{scale.factor}L, evaluation to {scale.eval_factor}L; {seeds(results)} seed(s).", "",
        "Every scheme trains with the same steps and tokens (equal compute); seconds are wall time.", "",
        "| stage | seconds | steps | tokens |", "|---|---|---|---|", *timing, f"| sum of the stages | {total:.0f} | | |", "",
        "With several workers, stages run at the same time, so their sum exceeds the wall time"
        + (f"; this command ran {wall:.0f} s" if wall else "")
        + (f", reusing {len(stages.skipped)} stages of an earlier run." if stages.skipped else "."),
        "",
        *observations(results), "",
        summary.replace("](", "](eval/").replace("# Long-context evaluation", "## Evaluation", 1),
    ]
    (run_dir / "report.md").write_text("\n".join(lines))
    print(f"wrote {run_dir / 'report.md'}")


def observations(results):
    """Plain sentences computed from the numbers: each model's loss against the reference's, within L and at the
    longest positions; then which differences of sliding-window perplexity exceed the seed spread."""
    L, ref, out = results["base_len"], results.get("reference"), ["## What the numbers say", ""]
    if ref:
        out += [f"Loss by position relative to **{ref}** (same positions, same documents), just before L and at "
                "the longest positions:", ""]
    for label, r in results["models"].items():
        pos = r.get("position", {})
        buckets = pos.get("relative") or pos.get("buckets", [])
        inside = [b for b in buckets if b["hi"] <= L and "mean" in b]
        last = buckets[-1] if buckets else None
        if not inside or last is None:
            continue
        if "cannot_run" in last:
            out.append(f"- **{label}**: cannot run past {pos['evaluated_len']} tokens "
                       f"({last['cannot_run'].split(';')[0]}).")
            continue
        near = sum(b["mean"] for b in inside[-2:]) / len(inside[-2:])  # the positions just before L
        what = "loss minus the reference's" if pos.get("relative") else "loss"
        out.append(f"- **{label}**: {what} {near:+.3f} just before L, {last['mean']:+.3f} at positions "
                   f"[{last['lo']}, {last['hi']}) ({last['mean'] - near:+.3f}).")
    return out + significance(results)


def significance(results):
    """For each pair of models in the sliding-window table, at L and at the longest window: does the difference
    of perplexity exceed the seed spread (sweep.differs: the mean ± std intervals over seeds do not overlap)?"""
    models = {k: r["ppl"] for k, r in results["models"].items() if r.get("ppl")}
    if not models:
        return []
    n = seeds(results)
    if n < 2:
        return ["", "One seed: there is no spread to judge a difference by, so none is called real here. "
                "`--seeds=3` trains every model three times and says which differences exceed the spread."]
    first = next(iter(models.values()))
    cols = [0, len(first) - 1]
    names = [f"W={first[i]['window']}" for i in cols]
    lines = ["", f"### Which differences exceed the seed spread ({n} seeds)", "",
             "A difference of sliding-window perplexity is called real when the two means differ by more than the "
             "sum of their standard deviations across seeds (their mean ± std intervals do not overlap).", "",
             "| model A | model B | " + " | ".join(f"B − A at {w} | real?" for w in names) + " |",
             "|---|---|" + "---|---|" * len(cols)]
    labels = list(models)
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            cells = []
            for c in cols:
                ea, eb = models[a][c], models[b][c]
                if "ppl" not in ea or "ppl" not in eb:
                    cells += ["cannot run", "—"]
                    continue
                real = differs({"mean": ea["ppl"], "std": ea.get("ppl_sd")}, {"mean": eb["ppl"], "std": eb.get("ppl_sd")})
                cells += [f"{eb['ppl'] - ea['ppl']:+.2f}", "yes" if real else "no"]
            lines.append(f"| {a} | {b} | " + " | ".join(cells) + " |")
    return lines


def run(scale, run_dir, command="python reproduce.py", seeds=1, workers=1, reference=""):
    """Every stage of the experiment at one scale, for each seed; finished stages are skipped. workers: see
    ReproduceConfig (the tests run in this process, workers=1)."""
    t0, run_dir = time.time(), Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    stages = Stages(run_dir)
    if not (Path(scale.data_dir) / "meta.json").exists():
        stages.done.pop("data", None)
    stages.run("data", lambda: prepare(scale.source, scale.data_dir, vocab_size=scale.vocab_size)["tokens"])
    seed_list = [train.TrainConfig.seed + i for i in range(seeds)]
    # In each seed the extended scheme trains first and its fine-tunes come next in the queue: with several
    # workers they start as soon as it is done, beside the other schemes' training.
    others = [s for s in SCHEMES if s != EXTENDED]
    stages.run_jobs([job for s in seed_list for job in (train_stage(scale, EXTENDED, s, run_dir),
                                                        *(fine_tune_stage(scale, m, s, run_dir) for m in FINE_TUNED),
                                                        *(train_stage(scale, o, s, run_dir) for o in others))],
                    workers)
    for s in seed_list:
        eval_cfg = evaluate.EvalConfig(data_dir=scale.data_dir, max_len=scale.eval_factor * scale.base_len,
                                       out_dir=str(seed_dir(run_dir, s) / "eval"), base_len=scale.base_len,
                                       reference=reference, resume=True, **scale.eval)
        stages.run(f"evaluate (seed {s})",
                   lambda c=eval_cfg, s=s: evaluate.evaluate(models_to_evaluate(scale, seed_dir(run_dir, s)), c) and None)
    results = merge_seeds([json.loads((seed_dir(run_dir, s) / "eval" / "results.json").read_text()) for s in seed_list])
    evaluate.write_report(results, run_dir / "eval")
    write_report(scale, run_dir, stages, command, results, time.time() - t0)
    return run_dir / "report.md"


def main(argv=None):
    cfg = parse(ReproduceConfig, argv, doc=__doc__)
    command = " ".join(["python reproduce.py", *(argv if argv is not None else [])])
    return run(SCALES[cfg.scale], Path(cfg.out_dir or f"runs/{cfg.scale}"), command, cfg.seeds, cfg.workers,
               cfg.reference)


if __name__ == "__main__":
    cli(lambda argv: main(argv) and None, errors=(ValueError, OSError, train.TrainingError))
