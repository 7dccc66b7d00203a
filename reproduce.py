"""The wall and the rescue, end to end, in one command.

    python reproduce.py                  # CPU scale: base 256 -> x4 and x8, under 30 minutes on 2 cores, offline
    python reproduce.py --scale cpu-quick  # the same, shorter, for smoke runs: a soft shape, not the wall
    python reproduce.py --scale gpu      # GPU scale: base 4096 -> 16k and 32k, the ~30M model on one GPU
    python reproduce.py my_scale.toml --data_dir=data/mine  # a scale of your own, on your corpus (docs/reproduce.md)
    python reproduce.py --seeds=3        # every model trained with 3 seeds: mean ± std, and which differences
                                         # exceed the seed spread
    python reproduce.py --schemes=+rope_nope,t5  # the five schemes and these two (--schemes=rope,alibi: only those)
    python reproduce.py --nonoverlapping=true  # also perplexity in non-overlapping windows, Press et al.'s mode,
                                               # which the comparison with the papers then uses
    python reproduce.py --rescues=all    # also the direct fine-tune (the control), ABF, PoSE, DroPE, Self-Extend
                                         # and searched LongRoPE (training-free and fine-tuned), and a rescue
                                         # table comparing every rescue (or --rescues=pose,abf)

A scale (lengths, corpus, steps, the train config and the evaluation) is a TOML file of Scale's keys: each
preset is a file configs/reproduce_<name>.toml that --scale <name> runs. The file is checked whole before
anything runs, and the corpus against the evaluation's lengths before any training.

Stages: prepare data -> train every position scheme at the base length -> extend RoPE (PI and YaRN
fine-tuned; PI, NTK, dynamic NTK and YaRN training-free) -> evaluate everything past the base length ->
explain the RoPE model and its fine-tunes (explain.py) -> report.md in the run folder, opened by the headline
figure (the wall, the rescue) and our ratios beside the papers', then tables and plots. Each seed's runs are
in <out_dir>/seed<N>/, the merged evaluation in <out_dir>/eval/. Finished stages are recorded in stages.json and skipped on a re-run (more
seeds later only add the new ones); an interrupted (exit 130 or 143) training stage resumes from its
checkpoint, an interrupted evaluation from the last model it finished. Training runs as jobs (posenc/jobs.py): with
the default --workers=0, one per GPU or two at once on a CPU, the RoPE fine-tunes as soon as RoPE is trained.
"""

import dataclasses
import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

import evaluate
import explain
import extend_context
import train
from data.prepare import DOCUMENT_UNITS, prepare
from posenc.cli import cli
from posenc.config import ConfigError, apply, at_least, check_fields, from_dict, parse, read_toml
from posenc.data import load_meta, n_long_documents
from posenc.jobs import Job, run_jobs
from posenc.papers import RESCUE, nearest
from posenc.eval_tasks import PPL_MODES
from posenc.plots import plot_headline, plot_rescues, ppl_mode_of, seeds, whole_window
from posenc.positions import SCHEMES
from posenc.rope_scaling import ROPE_SCALING, scaling_dict
from posenc.run_folder import holds_run, write_atomic
from posenc.run_stats import compute, differs, merge_seeds

ROOT = Path(__file__).resolve().parent
NONOVERLAPPING = "eval_nonoverlapping"  # the folder of the ppl task in non-overlapping windows (--nonoverlapping)
DEFAULT_SCHEMES = ("learned", "sinusoidal", "alibi", "rope", "none")  # trained unless --schemes says otherwise
EXTENDED = "rope"  # the scheme whose context is extended


@dataclass
class ReproduceConfig:
    scale: str = "cpu"  # a preset (configs/reproduce_<name>.toml) or a scale file's path, also as the first argument
    #                     cpu: base 256, ~30 min on 2 cores (cpu-quick: ~5, a soft shape); gpu: base 4096, one GPU
    out_dir: str = ""  # "": runs/<scale> (a file's: runs/<its name>)
    seeds: int = 1  # train every model with seeds 1337, 1338, ...: the tables give mean ± std over them
    workers: int = 0  # training runs at once (posenc.jobs); 0: one per visible GPU, or 2 on a CPU, 1: in this process
    reference: str = ""  # loss by position is also shown minus this model's; "": the first fine-tuned one
    schemes: tuple[str, ...] = DEFAULT_SCHEMES  # trained and compared; "+a,b": the default ones and a, b
    rescues: tuple[str, ...] = ()  # more rescue rows, and the rescue table: all, or some of direct, abf, pose,
    #                                drope, self_extend, longrope, longrope_tuned (comma-separated)
    # Overrides of the scale's settings (tests/test_rehearsal.py runs the GPU scale's lengths with them on a CPU):
    data_dir: str = ""  # "": the scale's; prepared from `source` unless it holds meta.json
    source: str = ""  # "": the scale's corpus (stdlib); or a folder of text files (data/prepare.py)
    documents: str = ""  # "": the scale's; files or folders, what one document of `source` is (data/prepare.py)
    vocab_size: int = 0  # compact vocabulary of the data (data/prepare.py); 0: the scale's
    train: dict | None = None  # train.py keys over the scale's config, e.g. {"n_layer": 2, "max_iters": 100}
    extend_steps: int = 0  # fine-tuning steps of the extensions; 0: the scale's
    extend: dict | None = None  # extend_context.py keys over the scale's, e.g. {"compile": false}
    eval: dict | None = None  # evaluate.py keys over the scale's, e.g. {"n_docs": 2, "passkey_trials": 1}
    nonoverlapping: bool = False  # also ppl in non-overlapping windows (eval_nonoverlapping/), beside the sliding ones

    def __post_init__(self):
        check_fields(self)
        scale_file(self.scale)  # an unknown preset fails here, in one line
        at_least(self, 1, "seeds")
        at_least(self, 0, "workers", "vocab_size", "extend_steps")
        self.rescues = tuple(RESCUES) if self.rescues == ("all",) else self.rescues
        unknown = [r for r in self.rescues if r not in RESCUES]
        if unknown:
            raise ConfigError(f"bad value {','.join(unknown)!r} for config key 'rescues': choose all, or some of "
                              f"{', '.join(RESCUES)}")
        self.schemes = wall_schemes(self.schemes)


def wall_schemes(given):
    """The schemes to train: `given`, or, when it starts with '+', DEFAULT_SCHEMES and the ones given."""
    names = [*(DEFAULT_SCHEMES if given and given[0].startswith("+") else ()), *(g.lstrip("+") for g in given)]
    for name in names:
        if name not in SCHEMES:
            raise ConfigError(f"bad value {name!r} for config key 'schemes': choose from {', '.join(SCHEMES)}")
    if EXTENDED not in names:
        raise ConfigError(f"config key 'schemes' must include {EXTENDED}: its context is the one extended")
    return tuple(dict.fromkeys(names))  # in order, once each


@dataclass(frozen=True)
class Scale:
    """Everything that differs between scales; the code is the same. A scale is a TOML file of these keys
    (configs/reproduce_<name>.toml, or the user's: load_scale), checked whole when made."""
    config: str  # configs/<config>.toml, trained once per scheme with --pos_encoding
    data_dir: str  # prepared from `source` (data/prepare.py) unless it already holds meta.json
    base_len: int  # L, the length every scheme trains at: the config's block_size
    vocab_size: int | None = None  # compact vocabulary (data/prepare.py --vocab_size); None (left out): GPT-2's 50257
    factor: int = 4  # fine-tuned extensions go to factor * base_len
    eval_factor: int = 8  # evaluation goes to eval_factor * base_len
    train: dict = field(default_factory=dict)  # train.py keys over the config, e.g. max_iters
    extend_steps: int = 100  # fine-tuning steps of each extension
    extend: dict = field(default_factory=dict)  # extend_context.py keys (and train.py's) of every fine-tune
    eval: dict = field(default_factory=dict)  # evaluate.EvalConfig keys, e.g. n_docs
    source: str = "stdlib"  # what data/prepare.py prepares into data_dir: stdlib, pg19, or a folder, file or glob
    documents: str = "files"  # one document per file, or per folder (data/prepare.py's folder_documents)
    explain_docs: int = 4  # held-out documents explain.py reads (at most eval's n_docs): each is a max_len forward

    def __post_init__(self):
        check_fields(self)
        at_least(self, 1, "base_len", "factor", "extend_steps", "explain_docs")
        if self.documents not in DOCUMENT_UNITS:
            raise ConfigError(f"bad value {self.documents!r} for config key 'documents': choose "
                              f"{' or '.join(DOCUMENT_UNITS)}")
        if self.eval_factor < self.factor:
            raise ConfigError(f"bad value {self.eval_factor} for config key 'eval_factor': the evaluation must reach "
                              f"the fine-tuned length, factor = {self.factor}")
        check_tables(self)


SET_BY_REPRODUCE = {  # keys a scale's tables may not hold: each stage gets them from the scale's own keys or flags
    "train": ("pos_encoding", "seed", "out_dir", "data_dir", "vocab_size", "resume"),
    "extend": ("ckpt", "method", "factor", "target_len", "steps", "out_dir", "resume"),
    "eval": ("ckpt", "labels", "data_dir", "max_len", "base_len", "out_dir", "reference", "resume"),
}


def as_flags(table):
    """A table of a scale (train.py or extend_context.py keys) as --key=value flags; values as JSON (true, 0.001)."""
    return [f"--{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in table.items()]


def check_tables(scale):
    """One line (ConfigError) for a key of the train, extend or eval table that its script does not take, a bad
    value, a key each stage sets itself, or a base_len that is not the length the train config trains at."""
    for table, keys in SET_BY_REPRODUCE.items():
        taken = [k for k in getattr(scale, table) if k in keys]
        if taken:
            raise ConfigError(f"{table}.{taken[0]} is set by reproduce.py for each stage, from the scale's own keys "
                              "(data_dir, vocab_size, base_len, factor, extend_steps, eval_factor) or its flags")
    config = ROOT / "configs" / f"{scale.config}.toml"
    if not config.is_file():
        names = [p.stem for p in sorted(config.parent.glob("*.toml")) if p not in presets().values()]
        raise ConfigError(f"bad value {scale.config!r} for config key 'config': no configs/{scale.config}.toml; "
                          f"choose a train config, {', '.join(names)}")
    try:
        table = "train"
        trained = train.load_config([str(config), *as_flags(scale.train)])
        table = "extend"
        _, rest = parse(extend_context.ExtendConfig, as_flags(scale.extend), passthrough=train.TrainConfig)
        parse(train.TrainConfig, rest)
        table = "eval"
        apply(evaluate.EvalConfig(), scale.eval)
    except ConfigError as e:
        raise ConfigError(f"in the {table} table: {e}") from None
    if trained.model.block_size != scale.base_len:
        raise ConfigError(f"base_len = {scale.base_len}, but configs/{scale.config}.toml with the train table trains "
                          f"at block_size = {trained.model.block_size}: make them equal")


def check_corpus(scale):
    """One line (ConfigError) before any training if the corpus's val split holds fewer documents of
    eval_factor * base_len + 1 tokens than the evaluation scores (its n_docs), unless eval.train_docs tops them up."""
    cfg = evaluate.EvalConfig(**scale.eval)
    if cfg.train_docs or not set(evaluate.DOCUMENT_TASKS) & set(cfg.tasks):
        return
    min_len = scale.eval_factor * scale.base_len + 1
    n_val = n_long_documents(scale.data_dir, "val", min_len)
    if n_val < cfg.n_docs:
        raise ConfigError(f"{scale.data_dir} has {n_val} held-out (val) documents of >= {min_len} tokens, and the "
                          f"evaluation to eval_factor x base_len = {min_len - 1} scores eval.n_docs = {cfg.n_docs}: "
                          "lower eval.n_docs or eval_factor, use a corpus with more long documents, or set "
                          "eval.train_docs = true to top them up from train (not held out)")


def presets():
    """name -> file of every preset scale: configs/reproduce_<name>.toml, "_" in the file's name "-" in the scale's
    (reproduce_cpu_quick.toml is --scale cpu-quick)."""
    return {p.stem.removeprefix("reproduce_").replace("_", "-"): p
            for p in sorted((ROOT / "configs").glob("reproduce_*.toml"))}


def scale_file(scale):
    """The file a --scale names: a path ending in .toml as given, else the preset of that name."""
    if scale.endswith(".toml"):
        return Path(scale)
    if scale not in presets():
        raise ConfigError(f"bad value {scale!r} for config key 'scale': choose {', '.join(presets())} (the files "
                          "configs/reproduce_<name>.toml), or give a scale file's path")
    return presets()[scale]


def load_scale(path, overrides=None):
    """The Scale of a TOML file, with overrides (Scale keys; the train, extend and eval tables merged key by key)
    over its keys; ConfigError, one line naming the file, for a missing, unknown or bad key."""
    keys = read_toml(str(path), Scale)  # a missing file or bad TOML: its own line
    for key, value in (overrides or {}).items():
        keys[key] = (keys[key] | value) if isinstance(value, dict) and isinstance(keys.get(key), dict) else value
    try:
        required = [f.name for f in dataclasses.fields(Scale)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [k for k in required if k not in keys]
        if missing:
            raise ConfigError(f"missing key '{missing[0]}': a scale sets at least {', '.join(required)}")
        return from_dict(Scale, keys)
    except ConfigError as e:
        raise ConfigError(f"scale {path}: {e}") from None


TRAINING_FREE = ("linear", "ntk", "dynamic", "yarn")  # rope_types evaluated with no fine-tuning
FINE_TUNED = ("linear", "yarn")  # rope_types fine-tuned at factor * base_len
HEADLINE_TRAINING_FREE = ("dynamic", "yarn")  # the training-free rows in the headline figure (all are in the tables)
HEADLINE_REFERENCE = "alibi"  # the headline's curves are loss minus this model's: flat past L, so the wall shows


@dataclass(frozen=True)
class Rescue:
    """A rescue beyond the default rows (--rescues): an extend_context.py run with the fine-tunes' steps and
    tokens (fine-tune), an inference option of the evaluation (inference: Self-Extend), or a training-free
    extension whose factors are searched on the training data (search: LongRoPE, posenc/longrope_search.py)."""
    label: str
    flags: tuple = ()  # extend_context.py flags of a fine-tune
    kind: Literal["fine-tune", "inference", "search"] = "fine-tune"

    @property
    def fine_tuned(self):
        return self.kind == "fine-tune"


LLAMA2_LONG_BASE = 5e5  # the base Xiong et al. raised Llama 2's 1e4 to (ABF); Xu et al.'s bound at 4 x 256 is below 1e4
RESCUES = {
    "direct": Rescue(f"{EXTENDED} + direct (no scaling) fine-tuned", ("--method=direct",)),
    "abf": Rescue(f"{EXTENDED} + ABF fine-tuned",
                  ("--method=abf", f'--scaling_params={{"base": {LLAMA2_LONG_BASE:g}}}')),
    "pose": Rescue(f"{EXTENDED} + PI + PoSE fine-tuned", ("--method=linear", "--pose=true")),
    "drope": Rescue(f"{EXTENDED} + DroPE recalibrated", ("--method=drope",)),
    "self_extend": Rescue(f"{EXTENDED} + Self-Extend (no fine-tune)", kind="inference"),
    "longrope": Rescue(f"{EXTENDED} + LongRoPE searched (no fine-tune)", kind="search"),
    "longrope_tuned": Rescue(f"{EXTENDED} + LongRoPE searched, fine-tuned", ("--method=longrope", "--search=true")),
}


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
            f"--out_dir={out_dir}", f"--data_dir={scale.data_dir}", *as_flags(scale.train)]
    if scale.vocab_size:
        argv.append(f"--vocab_size={scale.vocab_size}")
    if holds_run(out_dir):
        argv.append("--resume=true")  # an interrupted run continues as if never stopped
    steps = train.load_config(argv).max_iters
    return Job(train_name(scheme, seed), [(train.main, argv)], run_dir=str(out_dir), steps=steps, kind="train"), out_dir


def train_name(scheme, seed):
    return f"train {scheme} (seed {seed})"


def fine_tune_stage(scale, method, seed, run_dir):
    base, out_dir = seed_dir(run_dir, seed) / EXTENDED, seed_dir(run_dir, seed) / f"{EXTENDED}_{method}_ft"
    argv = [f"--ckpt={base / 'ckpt.pt'}", f"--method={method}", f"--factor={scale.factor}",
            f"--steps={scale.extend_steps}", f"--out_dir={out_dir}", *as_flags(scale.extend)]
    if holds_run(out_dir):
        argv.append("--resume=true")
    return Job(f"fine-tune {EXTENDED} with {ROPE_SCALING[method].label} (seed {seed})", [(extend_context.main, argv)],
               after=(train_name(EXTENDED, seed),), run_dir=str(out_dir), steps=scale.extend_steps,
               kind="fine-tune"), out_dir


def rescue_folder(name):
    """The run folder, in a seed's folder, of a fine-tuned or searched rescue."""
    return f"{EXTENDED}_longrope_search" if RESCUES[name].kind == "search" else f"{EXTENDED}_{name}_ft"


def rescue_stage(scale, name, seed, run_dir):
    """The extend_context.py job of a rescue in RESCUES: the PI and YaRN fine-tunes' steps and settings."""
    base, out_dir = seed_dir(run_dir, seed) / EXTENDED, seed_dir(run_dir, seed) / rescue_folder(name)
    factor = () if name == "drope" else (f"--factor={scale.factor}",)  # DroPE recalibrates at L
    argv = [f"--ckpt={base / 'ckpt.pt'}", *RESCUES[name].flags, *factor, f"--steps={scale.extend_steps}",
            f"--out_dir={out_dir}", *as_flags(scale.extend)]
    if holds_run(out_dir):
        argv.append("--resume=true")
    return Job(rescue_name(name, seed), [(extend_context.main, argv)], after=(train_name(EXTENDED, seed),),
               run_dir=str(out_dir), steps=scale.extend_steps, kind="fine-tune"), out_dir


def rescue_name(name, seed):
    """The stage that makes a rescue's model: its fine-tune job, its factor search, or None (inference only)."""
    kind = RESCUES[name].kind
    if kind == "search":
        return f"search LongRoPE factors (seed {seed})"
    return f"rescue {RESCUES[name].label} (seed {seed})" if kind == "fine-tune" else None


def self_extend_setting(scale):
    """(W, G) for Self-Extend: a quarter of L as the neighbor window, and the smallest group whose reach
    (L - W)·G + W covers the fine-tuned length factor·L."""
    window = scale.base_len // 4
    return window, math.ceil((scale.factor * scale.base_len - window) / (scale.base_len - window))


def free_label(method):
    return f"{EXTENDED} + {ROPE_SCALING[method].label} (no fine-tune)"


def tuned_label(method):
    return f"{EXTENDED} + {ROPE_SCALING[method].label} fine-tuned"


def models_to_evaluate(scale, run_dir, schemes=DEFAULT_SCHEMES, rescues=()):
    """label -> checkpoint, or (checkpoint, rope_scaling[, Self-Extend's (W, G)]) for a training-free option of
    the RoPE model."""
    run_dir = Path(run_dir)
    models = {scheme: run_dir / scheme / "ckpt.pt" for scheme in schemes}
    for method in TRAINING_FREE:
        models[free_label(method)] = (models[EXTENDED], scaling_dict(method, scale.factor, scale.base_len))
    for method in FINE_TUNED:
        models[tuned_label(method)] = run_dir / f"{EXTENDED}_{method}_ft" / "ckpt.pt"
    for name in rescues:
        r = RESCUES[name]
        models[r.label] = (run_dir / rescue_folder(name) / "ckpt.pt" if r.kind != "inference" else
                           (models[EXTENDED], None, self_extend_setting(scale)))
    return {k: (str(v[0]), *v[1:]) if isinstance(v, tuple) else str(v) for k, v in models.items()}


def explained(run_dir, seed):
    """label -> checkpoint of the models explain.py explains: the extended scheme and its fine-tunes."""
    d = seed_dir(run_dir, seed)
    return {EXTENDED: d / EXTENDED / "ckpt.pt", **{tuned_label(m): d / f"{EXTENDED}_{m}_ft" / "ckpt.pt" for m in FINE_TUNED}}


def explain_dir(run_dir, seed, label):
    return seed_dir(run_dir, seed) / "explain" / label.replace(" + ", "_").replace(" ", "_")


def why(run_dir):
    """The "why" section: for each explained model of the first seed, its attention sentence and its figures."""
    seed = train.TrainConfig.seed
    out = ["## Why (explain.py)", "",
           "For the RoPE model and its fine-tunes: which rotary pairs leave the angles they were trained on, how "
           "far a key can still weigh, and where attention goes past L (`python explain.py --ckpt=...`).", ""]
    for label in explained(run_dir, seed):
        d = explain_dir(run_dir, seed, label)
        if not (d / "explain.md").exists():
            continue
        rel = d.relative_to(run_dir)
        section = (d / "explain.md").read_text().split("## 3. What the trained model does")[1].split("![")[0]
        text = " ".join(ln for ln in section.strip().splitlines()[1:] if ln.strip())  # after "On N documents"
        figures = ", ".join(f"[{p.stem}]({rel / p.name})" for p in sorted(d.glob("*.png")))
        out += [f"- **{label}** ([explain.md]({rel / 'explain.md'}); {figures}): {text}"]
    return out


def write_experiment_report(scale, run_dir, stages, command, results, wall=None, rescues=(), nonoverlapping=None):
    """report.md: what ran, on what, with how much compute and time, then the evaluation's tables and plots.
    nonoverlapping: the merged results of the ppl task in non-overlapping windows, if it ran: its table joins the
    report, and the comparison with the papers uses it (their mode)."""
    run_dir = Path(run_dir)
    summary = (run_dir / "eval" / "summary.md").read_text().replace("](", "](eval/")  # its plots, from here
    if nonoverlapping:  # its table (titled by the mode) and plot just before the sliding-window ones
        table = (run_dir / NONOVERLAPPING / "summary.md").read_text().split("\n## ", 1)[1]
        block, sliding = "\n## " + table.replace("](", f"]({NONOVERLAPPING}/"), "\n## " + PPL_MODES["sliding"][0]
        summary = summary.replace(sliding, block + sliding, 1) if sliding in summary else summary + block
    meta = load_meta(scale.data_dir)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    total = sum(s["seconds"] for s in stages.done.values())
    train_tokens = (stages.done.get(train_name(EXTENDED, train.TrainConfig.seed), {}).get("result") or {}).get("tokens", 0)
    timing = []
    for name, s in stages.done.items():
        c = s.get("result") if isinstance(s.get("result"), dict) and "steps" in s["result"] else {}
        timing.append(f"| {name} | {s['seconds']:.0f} | {c.get('steps', '')} | "
                      f"{format(c['tokens'], ',') if 'tokens' in c else ''} |")
    figure = plot_headline(results, run_dir / "headline.png", [k for k in SCHEMES if k in results["models"]],
                           [EXTENDED, *map(tuned_label, FINE_TUNED)], [free_label(m) for m in HEADLINE_TRAINING_FREE],
                           reference=HEADLINE_REFERENCE if HEADLINE_REFERENCE in results["models"] else None)
    lines = [
        f"# The wall and the rescue (configs/{scale.config}.toml)", "",
        *(["![The wall and the rescue](headline.png)", "", *read_the_figure(results, scale), ""] if figure else []),
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
        *(rescue_table(results, scale, stages, rescues) if rescues else []),
        *(rescue_figure(results, scale, run_dir, rescues) if rescues else []),
        *beside_the_papers(nonoverlapping or results, scale, train_tokens), "",
        *observations(results), "",
        *why(run_dir), "",
        summary.replace("# Long-context evaluation", "## Evaluation", 1),
    ]
    (run_dir / "report.md").write_text("\n".join(lines))
    print(f"wrote {run_dir / 'report.md'}")


def rescue_table(results, scale, stages, rescues):
    """Every rescue of the RoPE model side by side: perplexity at L, 2L, 4L, 8L (sliding windows), the
    short-context loss against the base model's, and the steps, tokens and seconds its training took (seed
    1337's stage; training-free rows took none)."""
    seed, L, models = train.TrainConfig.seed, scale.base_len, results["models"]
    rows = [(EXTENDED, None), *((free_label(m), None) for m in TRAINING_FREE),
            *((tuned_label(m), f"fine-tune {EXTENDED} with {ROPE_SCALING[m].label} (seed {seed})") for m in FINE_TUNED),
            *((RESCUES[r].label, rescue_name(r, seed)) for r in rescues)]
    ks = [k for k in (1, 2, 4, 8) if k <= scale.eval_factor]
    short = models[EXTENDED].get("short", {}).get("loss")
    window, group = self_extend_setting(scale)
    out = ["## Every rescue, side by side", "",
           f"Sliding-window perplexity of the RoPE model and each rescue at k·L (L = {L}); the short-context loss "
           f"minus {EXTENDED}'s; the training each took (fine-tunes: {scale.extend_steps} steps at {scale.factor}L, "
           f"PoSE at L with position ids to {scale.factor}L, DroPE recalibrated at L; seed {seed}). Self-Extend: "
           f"W = {window}, G = {group} (reach (L − W)·G + W = {(L - window) * group + window}); ABF's base "
           f"{LLAMA2_LONG_BASE:g} (Llama 2 Long's).", "",
           "| model | " + " | ".join(f"ppl {k}L" for k in ks) + " | short loss Δ | steps | tokens | seconds |",
           "|---|" + "---|" * (len(ks) + 4)]
    rows = [(label, stage) for label, stage in rows if label in models]
    names, note = whole_window(models, [label for label, _ in rows])  # dynamic NTK, LongRoPE: marked, with a note
    for name, (label, stage) in zip(names, rows):
        ppl = {e["window"]: e for e in models[label].get("ppl", []) if e.get("ppl")}
        cells = [ppl_cell(ppl[k * L]) if k * L in ppl else "cannot run" for k in ks]
        own = models[label].get("short", {}).get("loss")
        cells.append(f"{own - short:+.3f}" if own is not None and short is not None else "")
        done = stages.done.get(stage or "", {})
        c = done.get("result") if isinstance(done.get("result"), dict) else {}
        cells += [str(c.get("steps", 0 if stage is None else "")), format(c["tokens"], ",") if "tokens" in c else
                  ("0" if stage is None else ""), f"{done['seconds']:.0f}" if "seconds" in done else
                  ("0" if stage is None else "")]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return out + note + [""]


def rescue_figure(results, scale, run_dir, rescues):
    """rescues.png (one panel per rescue, against RoPE and the PI fine-tune) and its reading, from the numbers:
    which rescues end below the PI fine-tune's perplexity at the fine-tuned length and at the longest window."""
    models, L, baseline = results["models"], scale.base_len, tuned_label(FINE_TUNED[0])
    labels = [RESCUES[r].label for r in rescues if RESCUES[r].label in models]
    reference = HEADLINE_REFERENCE if HEADLINE_REFERENCE in models else None
    if not labels or baseline not in models or not plot_rescues(results, run_dir / "rescues.png", EXTENDED,
                                                                baseline, labels, reference):
        return []
    ppl = {k: {e["window"] // L: e for e in models[k].get("ppl", []) if "ppl" in e} for k in (baseline, *labels)}
    out = ["![Every rescue, one per panel](rescues.png)", "",
           "Each rescue against the PI fine-tune" + (" (one seed: no difference here is tested against a seed "
                                                    "spread)" if seeds(results) == 1 else
                                                    f" (mean ± std over {seeds(results)} seeds; beyond or within "
                                                    "the spread: whether the mean ± std intervals are apart)") + ":",
           ""]
    for k in sorted({scale.factor, scale.eval_factor}):
        if k not in ppl[baseline]:
            continue
        base = ppl[baseline][k]
        ranked = sorted((p[k]["ppl"], label.removeprefix(f"{EXTENDED} + "), p[k]) for label, p in ppl.items()
                        if label != baseline and k in p)
        text = {"below": [], "at or above": []}
        for value, name, e in ranked:
            real = differs({"mean": value, "std": e.get("ppl_sd")}, {"mean": base["ppl"], "std": base.get("ppl_sd")})
            spread = "" if real is None else " (beyond the spread)" if real else " (within it)"
            text["below" if value < base["ppl"] else "at or above"].append(f"{name} {ppl_cell(e)}{spread}")
        out.append(f"- At {k}L, against {baseline}'s perplexity {ppl_cell(base)}: "
                   + "; ".join(f"{side} it {', '.join(names) or 'none'}" for side, names in text.items()) + ".")
    return out + [""]


def ppl_cell(e):
    """A perplexity entry as 'mean' or, merged over seeds, 'mean ± std'."""
    return f"{e['ppl']:.2f}" + (f" ± {e['ppl_sd']:.2f}" if e.get("ppl_sd") is not None else "")


def ratios(results, label):
    """{k: perplexity at k·L over that at L} of a model (in the evaluation's ppl mode), for the windows it can run."""
    ppl = {e["window"]: e["ppl"] for e in results["models"][label].get("ppl", []) if "ppl" in e}
    L = results["base_len"]
    return {w // L: p / ppl[L] for w, p in ppl.items() if L in ppl and w % L == 0}


def _ratio_text(r, ks):
    return " / ".join(f"{r[k]:.2f}" if k in r else "cannot run" for k in ks)


def read_the_figure(results, scale):
    """The figure's caption, from the numbers: how each scheme's perplexity grows past L, and what the rescue
    does at the fine-tuned length and to the short context."""
    models, L, f = results["models"], results["base_len"], scale.factor
    ks = sorted({k for label in models for k in ratios(results, label)} - {1})
    walls = [f"{k} {_ratio_text(ratios(results, k), ks)}" for k in SCHEMES if k in models]
    mode = PPL_MODES[ppl_mode_of(models[EXTENDED]["ppl"])][0].split("-window")[0].lower()  # sliding, non-overlapping
    out = [f"**The wall** (left). Perplexity at {' / '.join(f'{k}L' for k in ks)} over perplexity at L = {L} "
           f"({mode} windows): {'; '.join(walls)}."]
    base = {e["window"]: e["ppl"] for e in models[EXTENDED]["ppl"] if "ppl" in e}
    short = models[EXTENDED].get("short", {}).get("loss")
    rescued = []
    for label in map(tuned_label, FINE_TUNED):
        own = {e["window"]: e["ppl"] for e in models[label]["ppl"] if "ppl" in e}
        if f * L not in own or L not in own or f * L not in base:
            continue
        text = (f"{label} {own[f * L] / own[L]:.2f}× its own perplexity at L, {1 - own[f * L] / base[f * L]:.0%} "
                f"below {EXTENDED} at {f}L")
        if short is not None and "short" in models[label]:
            text += f", short-context loss {models[label]['short']['loss'] - short:+.3f} against {EXTENDED}'s"
        rescued.append(text)
    free = [f"{m} {base_ratio:.2f}×" for m, base_ratio in
            ((free_label(m), ratios(results, free_label(m)).get(f)) for m in TRAINING_FREE) if base_ratio]
    out.append("")  # two paragraphs
    out.append(f"**The rescue** (right), at {f}L: " + "; ".join(rescued)
               + (f". Training-free, perplexity at {f}L over L: " + ", ".join(free) if free else "") + ".")
    return out


def beside_the_papers(results, scale, tokens):
    """Our ratios ppl(kL)/ppl(L) next to Press et al.'s at the nearest multiple of their L (posenc/papers.py); tokens:
    what the extended scheme trained on."""
    params = results["models"][EXTENDED]["params"]
    ks = sorted({k for label in results["models"] for k in ratios(results, label)} - {1})
    mode = ppl_mode_of(results["models"][EXTENDED]["ppl"])
    out = ["## Beside the papers", "",
           f"Perplexity at k·L over perplexity at L. Ours: {PPL_MODES[mode][1]}, on "
           f"{results['documents']['source']}; Press et al.: non-overlapping windows on WikiText-103, at their "
           "evaluation length nearest to k·L (that multiple of their L in brackets; — : not in their tables).", "",
           "| scheme | " + " | ".join(f"ours {k}L | paper" for k in ks) + " |", "|---|" + "---|---|" * len(ks)]
    sources, differences = {}, []
    for scheme in SCHEMES:
        if scheme not in results["models"]:
            continue
        ours, cells = ratios(results, scheme), []
        for k in ks:
            paper = nearest(scheme, k)
            if paper:
                mark = sources.setdefault(paper["source"], f"[{len(sources) + 1}]")
            cells += [f"{ours[k]:.2f}" if k in ours else "cannot run",
                      f"{paper['ratio']:.2f} ({paper['multiple']:.1f}L) {mark}" if paper else "—"]
        out.append(f"| {scheme} | " + " | ".join(cells) + " |")
        paper_at = {k: nearest(scheme, k) for k in ks if k in ours and nearest(scheme, k)}
        if paper_at:
            words = [f"{'steeper' if ours[k] > p['ratio'] else 'milder'} at {k}L ({ours[k]:.2f} vs {p['ratio']:.2f})"
                     for k, p in paper_at.items()]
            differences.append(f"{scheme}: ours is " + ", ".join(words))
    out += ["", "Sources: " + "; ".join(f"{mark} {source}" for source, mark in sources.items()) + ".",
            "", "What the rescue papers report, beside ours above: "
            + "; ".join(f"{who}: {what}" for who, what in RESCUE) + ".", "",
            "Our shape against theirs, scheme by scheme: " + "; ".join(differences) + ".", "",
            f"Where we differ: our models have {params / 1e6:.1f}M parameters trained on {tokens / 1e6:.1f}M tokens "
            f"({tokens / params:.1f} per parameter), not 247M on WikiText-103 or 7B LLaMAs; "
            + ("our windows slide (every scored token sees at least W − S of context) where Press et al.'s do not "
               "(--nonoverlapping=true measures in theirs); " if mode == "sliding" else
               "our windows, as Press et al.'s, do not overlap; ")
            + "and our fine-tunes "
            f"run {scale.extend_steps} steps at {scale.factor}L, where PI and YaRN train hundreds of steps on "
            "billions of tokens. The shapes, not the values, are what carry over."]
    return out


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
    return out + claims(results) + significance(results)


def claims(results):
    """The headline's claims against the seed spread, by the rule of `significance`: does each model's
    sliding-window perplexity at k·L differ from its own at L (the wall, or its absence), and does each model
    extended past L differ from the extended scheme at the same window (the rescue)?"""
    if seeds(results) < 2:
        return []
    L, models = results["base_len"], results["models"]
    ppl = {label: {e["window"]: e for e in r.get("ppl", [])} for label, r in models.items() if r.get("ppl")}
    if EXTENDED not in ppl or L not in ppl[EXTENDED]:
        return []
    windows = sorted(w for w in ppl[EXTENDED] if w > L)

    def cell(a, b):  # b against a: the ratio of the means, and whether the difference exceeds the spread
        if "ppl" not in a or "ppl" not in b:
            return "cannot run"
        real = differs({"mean": a["ppl"], "std": a.get("ppl_sd")}, {"mean": b["ppl"], "std": b.get("ppl_sd")})
        return f"{b['ppl'] / a['ppl']:.2f}× ({'beyond' if real else 'within'})"

    lines = ["", f"### The claims against the seed spread ({seeds(results)} seeds)", "",
             "Each cell is a ratio of mean perplexities, and whether the two differ by more than the sum of their "
             "standard deviations across seeds (beyond) or not (within). Left: each model at k·L against itself "
             f"at L (the wall: beyond and above 1; flat: within). Right: each model against {EXTENDED} at the "
             "same window (the rescue: beyond and below 1).", "",
             "| model | " + " | ".join(f"{w // L}L / L" for w in windows) + " | "
             + " | ".join(f"against {EXTENDED} at {w // L}L" for w in windows) + " |",
             "|---|" + "---|" * 2 * len(windows)]
    for label, p in ppl.items():
        own = [cell(p[L], p[w]) if L in p and w in p else "—" for w in windows]
        against = ["" if label == EXTENDED else cell(ppl[EXTENDED][w], p[w]) if w in p else "—" for w in windows]
        lines.append(f"| {label} | " + " | ".join(own + against) + " |")
    return lines


def significance(results):
    """For each pair of models in the sliding-window table, at L and at the longest window: does the difference
    of perplexity exceed the seed spread (run_stats.differs: the mean ± std intervals over seeds do not overlap)?"""
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


def one_reference(per_seed, reference):
    """Each seed's results with loss by position relative to the same model, before the seeds are merged: an
    evaluation's own default reference depends on the order of its models, which a later run may change."""
    for r in per_seed:
        for m in r["models"].values():
            m.get("position", {}).pop("relative", None)
        r["reference"] = evaluate.add_relative(r, reference)
    return per_seed


def data_stage(scale):
    """The corpus's token counts by split, prepared from scale.source first unless data_dir already holds meta.json:
    a prepared corpus (the user's own, or an earlier run's) is used as it is, never prepared over."""
    if (Path(scale.data_dir) / "meta.json").exists():
        return load_meta(scale.data_dir)["tokens"]
    return prepare(scale.source, scale.data_dir, vocab_size=scale.vocab_size, documents=scale.documents)["tokens"]


def search_stage(scale, seed_folder):
    """The searched LongRoPE extension of the seed's RoPE model, training-free (posenc/longrope_search.py)."""
    ext = extend_context.ExtendConfig(ckpt=str(seed_folder / EXTENDED / "ckpt.pt"), method="longrope",
                                      factor=scale.factor, search=True,
                                      out_dir=str(seed_folder / rescue_folder("longrope")))
    extend_context.extend(ext, {"data_dir": scale.data_dir, "overwrite": True})  # overwrite: an interrupted one
    return {"steps": 0, "tokens": 0}  # no training: the rescue table gives the search's seconds


def run(scale, run_dir, command="python reproduce.py", seeds=1, workers=1, reference="",
        schemes=DEFAULT_SCHEMES, rescues=(), nonoverlapping=False):
    """Every stage of the experiment at one scale, for each seed; finished stages are skipped. workers, schemes,
    nonoverlapping: see ReproduceConfig (the tests run in this process, workers=1); rescues: names in RESCUES."""
    t0, run_dir = time.time(), Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    stages = Stages(run_dir)
    if not (Path(scale.data_dir) / "meta.json").exists():
        stages.done.pop("data", None)
    stages.run("data", lambda: data_stage(scale))
    check_corpus(scale)  # before any training: the evaluation at the end must have its documents
    seed_list = [train.TrainConfig.seed + i for i in range(seeds)]
    # In each seed the extended scheme trains first and its fine-tunes come next in the queue: with several
    # workers they start as soon as it is done, beside the other schemes' training.
    others = [s for s in schemes if s != EXTENDED]
    stages.run_jobs([job for s in seed_list for job in (train_stage(scale, EXTENDED, s, run_dir),
                                                        *(fine_tune_stage(scale, m, s, run_dir) for m in FINE_TUNED),
                                                        *(rescue_stage(scale, r, s, run_dir) for r in rescues
                                                          if RESCUES[r].fine_tuned),
                                                        *(train_stage(scale, o, s, run_dir) for o in others))],
                    workers)
    for s in seed_list:
        for r in (r for r in rescues if RESCUES[r].kind == "search"):
            stages.run(rescue_name(r, s), lambda s=s: search_stage(scale, seed_dir(run_dir, s)))
        eval_cfg = evaluate.EvalConfig(data_dir=scale.data_dir, max_len=scale.eval_factor * scale.base_len,
                                       out_dir=str(seed_dir(run_dir, s) / "eval"), base_len=scale.base_len,
                                       reference=reference or tuned_label(FINE_TUNED[0]), resume=True, **scale.eval)
        # a run that adds schemes or rescues evaluates them in a new stage (the finished models are reused)
        added = [*(k for k in schemes if k not in DEFAULT_SCHEMES), *rescues]
        models = models_to_evaluate(scale, seed_dir(run_dir, s), schemes, rescues)
        stages.run(f"evaluate (seed {s})" + (f" with {', '.join(added)}" if added else ""),
                   lambda c=eval_cfg, m=models: evaluate.run_tasks(m, c) and None)
        if nonoverlapping:  # the ppl task alone, in Press et al.'s mode, on the same documents
            c = dataclasses.replace(eval_cfg, tasks=("ppl",), ppl_mode="nonoverlapping", stride=0,
                                    out_dir=str(seed_dir(run_dir, s) / NONOVERLAPPING))
            stages.run(f"non-overlapping perplexity (seed {s})" + (f" with {', '.join(added)}" if added else ""),
                       lambda c=c, m=models: evaluate.run_tasks(m, c) and None)
        for label, ckpt in explained(run_dir, s).items():
            cfg = explain.ExplainConfig(ckpt=str(ckpt), max_len=eval_cfg.max_len, train_docs=eval_cfg.train_docs,
                                        n_docs=min(scale.explain_docs, eval_cfg.n_docs),
                                        out_dir=str(explain_dir(run_dir, s, label)), overwrite=True)
            stages.run(f"explain {label} (seed {s})", lambda c=cfg: explain.explain(c) and None)
    per_seed = [json.loads((seed_dir(run_dir, s) / "eval" / "results.json").read_text()) for s in seed_list]
    results = merge_seeds(one_reference(per_seed, reference or tuned_label(FINE_TUNED[0])))
    evaluate.write_results(results, run_dir / "eval")
    disjoint = None
    if nonoverlapping:
        disjoint = merge_seeds([json.loads((seed_dir(run_dir, s) / NONOVERLAPPING / "results.json").read_text())
                                for s in seed_list])
        evaluate.write_results(disjoint, run_dir / NONOVERLAPPING)
    write_experiment_report(scale, run_dir, stages, command, results, time.time() - t0, rescues, disjoint)
    return run_dir / "report.md"


def scale_of(cfg):
    """The scale cfg.scale names (a preset or a file) with cfg's overrides over it."""
    given = {"data_dir": cfg.data_dir, "source": cfg.source, "documents": cfg.documents,
             "vocab_size": cfg.vocab_size, "train": cfg.train,
             "extend_steps": cfg.extend_steps, "extend": cfg.extend, "eval": cfg.eval}
    return load_scale(scale_file(cfg.scale), {k: v for k, v in given.items() if v})  # "", 0, None: the scale's


def main(argv=None):
    cfg = parse(ReproduceConfig, argv, doc=__doc__, file_key="scale")  # `reproduce.py my.toml`: --scale=my.toml
    command = " ".join(["python reproduce.py", *(argv if argv is not None else [])])
    name = Path(cfg.scale).stem if cfg.scale.endswith(".toml") else cfg.scale
    return run(scale_of(cfg), Path(cfg.out_dir or f"runs/{name}"), command, cfg.seeds, cfg.workers,
               cfg.reference, cfg.schemes, cfg.rescues, cfg.nonoverlapping)


if __name__ == "__main__":
    cli(lambda argv: main(argv) and None, errors=(ValueError, OSError, train.TrainingError))
