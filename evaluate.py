"""Long-context evaluation: where each position scheme hits the wall, and whether extension moves it.

    python evaluate.py --ckpt=out/cpu_rope/ckpt.pt,out/cpu_alibi/ckpt.pt --data_dir=data/stdlib4k --max_len=2048
    python evaluate.py --ckpt=out/cpu_rope/ckpt.pt --rope_scaling='{"rope_type": "dynamic", "factor": 4,
        "original_max_position_embeddings": 256}' --tasks=ppl,passkey      # a training-free scaling
    python evaluate.py --ckpt=out/cpu_rope/ckpt.pt --self_extend=64,5      # Self-Extend: W=64, G=5, training-free
    python evaluate.py --ckpt=out/cpu_alibi/ckpt.pt --tasks=ppl --ppl_mode=nonoverlapping  # Press et al.'s windows

For one or more checkpoints, on held-out documents of a prepared corpus, runs the tasks of posenc/eval_tasks.py (loss by
position, perplexity in sliding or non-overlapping windows, short-context loss, passkey, recall) and writes
<out_dir>/results.json (every number), summary.md (tables) and PNG plots (if matplotlib is installed). With
--resume, a model whose checkpoint and settings are unchanged since the last run is not evaluated again.
"""

import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from posenc.checkpoint import model_from_checkpoint
from posenc.cli import cli
from posenc.config import ConfigError, at_least, check_fields, parse
from posenc.data import EVAL_DOCS, check_vocabulary, data_identity, held_out_documents, load_meta, load_split
from posenc.eval_tasks import TASKS, EvalData, log, relative_loss, training_length
from posenc.metrics import start_wandb
from posenc.positions import check_self_extend_flag, set_self_extend
from posenc.run_folder import claim, clear, write_atomic
from posenc.runtime import autocast, resolve_device, resolve_dtype

DOCUMENT_TASKS = ("position", "ppl")  # the tasks scored on held-out long documents (n_docs of max_len + 1 tokens)
RESULTS_FORMAT = 2  # bump when what a task records changes: earlier results are then not reused (2: doc_means)


@dataclass
class EvalConfig:
    ckpt: tuple[str, ...] = ()  # checkpoint paths, comma-separated (required on the command line)
    labels: tuple[str, ...] = ()  # one per checkpoint (default: their folder names)
    data_dir: str = "data/stdlib"
    max_len: int = 2048  # the longest context evaluated
    base_len: int | None = None  # L; None: the shortest training length among the models
    out_dir: str = "out/eval"
    tasks: tuple[str, ...] = tuple(TASKS)
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 autocast where native (runtime.resolve_dtype)
    n_docs: int = EVAL_DOCS  # long documents for the position and ppl tasks
    train_docs: bool = False  # top up from train when val has fewer than n_docs long enough: scores documents a
    #                           model may have trained on, so only when asked (default: refused in one line)
    batch_size: int = 1  # documents per forward at max_len (shorter windows get more)
    passkey_trials: int = 5  # per length and depth
    passkey_depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)  # where the key sits, as a fraction of the filler
    short_windows: int = 64  # windows of the base length for the short-context loss
    stride: int = 0  # sliding-window stride of ppl; 0: min(256, W / 2) as the papers; larger than W: W (no overlap)
    ppl_mode: Literal["sliding", "nonoverlapping"] = "sliding"  # ppl's windows (eval_tasks.PPL_MODES); nonoverlapping:
    #                                                             Press et al.'s, stride W
    recall_trials: int = 16  # probes per distance
    span_len: int = 16  # recall: tokens in the repeated span
    recall_kind: Literal["random", "text"] = "random"  # span of random tokens (only copying predicts it) or text
    seed: int = 0
    rope_scaling: dict | None = None  # applied to every checkpoint given by path ({}: none)
    self_extend: tuple[int, ...] = ()  # W,G: Self-Extend (training-free) on every checkpoint given by path
    wandb: Literal["off", "offline", "online"] = "off"
    reference: str = ""  # loss by position is also shown minus this model's (a label); "": the extended model
    resume: bool = False  # reuse results of unchanged checkpoints and settings in out_dir/results.json
    overwrite: bool = False  # replace an earlier evaluation in out_dir (without it, or resume, it is refused)

    def __post_init__(self):
        check_fields(self)
        at_least(self, 1, "max_len", "base_len", "n_docs", "batch_size", "passkey_trials", "recall_trials", "span_len")
        at_least(self, 0, "stride")
        at_least(self, 1, "short_windows")
        if not self.passkey_depths or not all(0 <= d <= 1 for d in self.passkey_depths):
            raise ConfigError(f"bad value {self.passkey_depths!r} for config key 'passkey_depths': expected "
                              "fractions in [0, 1], e.g. 0,0.5,1")
        check_self_extend_flag(self.self_extend)
        if self.ppl_mode == "nonoverlapping" and self.stride:
            raise ConfigError(f"stride={self.stride} slides the windows, but ppl_mode=nonoverlapping sets the stride "
                              "to the window: give one of them")
        unknown = set(self.tasks) - set(TASKS)
        if unknown or not self.tasks:
            raise ConfigError(f"bad value {','.join(self.tasks)!r} for config key 'tasks': choose from {', '.join(TASKS)}")

    def settings(self, base_len):
        """What a result depends on besides the checkpoint: a change means evaluating again."""
        keep = ("max_len", "data_dir", "tasks", "n_docs", "passkey_trials", "recall_trials", "span_len", "seed",
                "recall_kind", "dtype", "passkey_depths", "stride", "short_windows")
        # ppl_mode and train_docs only when not the default, so results from before they existed are still reused
        mode = {"ppl_mode": self.ppl_mode} if self.ppl_mode != "sliding" else {}
        train_docs = {"train_docs": True} if self.train_docs else {}
        return json.loads(json.dumps({k: getattr(self, k) for k in keep} | mode | train_docs
                                     | {"base_len": base_len, "format": RESULTS_FORMAT}))


def load_models(models, labels=(), device="cpu", rope_scaling=None, self_extend=()):
    """{label: model} from checkpoint paths (a list) or a dict of label -> GPT, path, (path, rope_scaling) to
    evaluate a checkpoint with another scaling (e.g. dynamic NTK with no fine-tuning), or (path, rope_scaling,
    (W, G)) to run it with Self-Extend."""
    if not isinstance(models, dict):
        models = list(models)
        labels = list(labels) or [Path(p).parent.name or Path(p).stem for p in models]
        if len(labels) != len(models) or len(set(labels)) != len(labels):
            raise ValueError(f"need one distinct label per checkpoint, got labels {labels}")
        models = dict(zip(labels, models))
    out = {}
    for label, m in models.items():
        if isinstance(m, (str, Path, tuple)):
            path, scaling, extend = (*m, ())[:3] if isinstance(m, tuple) else (m, rope_scaling, self_extend)
            m, ckpt = model_from_checkpoint(str(path), device, override_scaling=scaling)
            if extend:
                set_self_extend(m, *extend)
            stat = Path(path).stat()  # what a result was computed from: a changed checkpoint is evaluated anew
            m.checkpoint_id = (f"{path} {stat.st_size} {stat.st_mtime_ns} {json.dumps(scaling)}"
                               + (f" self_extend={list(extend)}" if extend else ""))
            m.trained_on = ckpt.get("data")  # its data's identity: the vocabulary must match the evaluation data
        out[label] = m.eval()
    return out


def eval_data(cfg: EvalConfig, base_len: int) -> tuple[EvalData, str]:
    """The documents, lengths and probes every model is evaluated on, and a note on where the documents came from."""
    tokenizer = None
    if "passkey" in cfg.tasks:
        from posenc.tokenizer import tokenizer_for
        try:
            tokenizer = tokenizer_for(load_meta(cfg.data_dir).get("vocab"))  # the data's (and models') vocabulary
        except RuntimeError as e:
            raise ValueError(str(e)) from None
    docs, note = ([], "")
    if set(DOCUMENT_TASKS) & set(cfg.tasks):
        docs, note = held_out_documents(cfg.data_dir, cfg.max_len + 1, cfg.n_docs, cfg.train_docs)
    lengths = [base_len * k for k in (1, 2, 4, 8) if base_len * k <= cfg.max_len]
    prefix = min(32, base_len // 4)
    distances = [n - prefix - cfg.span_len for n in (base_len // 4, base_len // 2, *lengths)
                 if n - prefix >= 2 * cfg.span_len]
    data = EvalData(docs=[d[:cfg.max_len + 1] for d in docs], stream=load_split(cfg.data_dir, "val"),
                    tokenizer=tokenizer, max_len=cfg.max_len, base_len=base_len, lengths=lengths, distances=distances,
                    prefix_len=prefix, span_len=cfg.span_len, batch_size=cfg.batch_size,
                    passkey_trials=cfg.passkey_trials, recall_trials=cfg.recall_trials, recall_kind=cfg.recall_kind,
                    seed=cfg.seed, passkey_depths=cfg.passkey_depths, stride=cfg.stride, ppl_mode=cfg.ppl_mode,
                    short_windows=cfg.short_windows)
    return data, note


def run_tasks(models, cfg: EvalConfig):
    """Run cfg.tasks for every model (see load_models); write results.json, summary.md and plots to cfg.out_dir
    (if set) and return the results. With cfg.resume, reuse a checkpoint's results from out_dir/results.json
    when it and every setting are unchanged."""
    device = resolve_device(cfg.device)
    dtype, why_dtype = resolve_dtype(cfg.dtype, device)
    log(f"dtype {dtype} ({why_dtype})")
    models = load_models(models, cfg.labels, device, cfg.rope_scaling, cfg.self_extend)
    if cfg.reference and cfg.reference not in models:
        raise ConfigError(f"bad value {cfg.reference!r} for config key 'reference': choose one of {', '.join(models)}")
    identity = data_identity(cfg.data_dir)
    for label, model in models.items():
        check_vocabulary(getattr(model, "trained_on", None), identity, f"model {label!r}")
    base_len = cfg.base_len or min(training_length(m) for m in models.values())
    if base_len > cfg.max_len:
        raise ConfigError(f"max_len={cfg.max_len} is shorter than the base length L={base_len}: evaluate at least L")
    data, note = eval_data(cfg, base_len)
    settings = cfg.settings(base_len)
    results = {"max_len": cfg.max_len, "base_len": base_len, "data_dir": str(cfg.data_dir), "tasks": list(cfg.tasks),
               "documents": {"n_docs": len(data.docs), "doc_len": cfg.max_len + 1, "source": note,
                             "train_docs": cfg.train_docs}, "models": {},
               "settings": settings, "complete": False}
    owner = claim(cfg.out_dir, cfg.resume, cfg.overwrite, what="evaluation") if cfg.out_dir else nullcontext()
    with owner:
        saved = Path(cfg.out_dir) / "results.json" if cfg.out_dir else None
        earlier = json.loads(saved.read_text()) if cfg.resume and saved and saved.exists() else {}
        if cfg.out_dir and cfg.overwrite and not cfg.resume:
            clear(cfg.out_dir)
        earlier = earlier.get("models", {}) if earlier.get("settings") == settings else {}
        for label, model in models.items():
            checkpoint_id = getattr(model, "checkpoint_id", None)
            if checkpoint_id and earlier.get(label, {}).get("checkpoint_id") == checkpoint_id:
                results["models"][label] = earlier[label]
                log(f"{label}: evaluated in an earlier run with the same checkpoint and settings, reused")
                continue
            c = model.config
            r = results["models"][label] = {"pos_encoding": c.pos_encoding, "block_size": c.block_size,
                                            "rope_scaling": c.rope_scaling, "training_length": training_length(model),
                                            "params": model.num_params(), "checkpoint_id": checkpoint_id}
            log(f"{label}: {c.pos_encoding}, block_size {c.block_size}, scaling {c.rope_scaling}")
            for task in cfg.tasks:
                with autocast(device, dtype):
                    r[task] = TASKS[task](model, data)
            if saved:
                write_json(results, saved)  # after each model: partial results survive, and --resume reuses them
        results["reference"] = add_relative(results, cfg.reference)
        results["complete"] = True
        if cfg.out_dir:
            write_results(results, cfg.out_dir, cfg.wandb)
    return results


def add_relative(results, reference=""):
    """Give every model's loss by position minus the reference's (tasks.relative_loss) as position["relative"].
    The default reference is the first model with the longest block_size, if that is longer than its training
    length (an extended model: one that uses positions right past L). Returns its label, or None."""
    models = {k: r for k, r in results["models"].items() if "position" in r}
    if not reference:
        longest = max((r["block_size"] for r in models.values()), default=0)
        reference = next((k for k, r in models.items() if r["block_size"] == longest > r["training_length"]), None)
    if reference not in models:
        return None
    for r in models.values():
        r["position"]["relative"] = relative_loss(r["position"], models[reference]["position"])
    return reference


def write_json(results, path):
    """results as JSON, NaN and inf written as null (valid JSON for every reader)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(json.loads(json.dumps(results), parse_constant=lambda c: None), indent=1))


def write_results(results, out_dir, wandb="off"):
    """summary.md and the plots; logged to wandb when asked. Reusable on a loaded results.json."""
    from posenc.plots import plot_all, results_markdown
    out_dir = Path(out_dir)
    write_json(results, out_dir / "results.json")
    md = results_markdown(results)
    pngs = plot_all(results, out_dir)
    write_atomic(out_dir / "summary.md", md + "".join(f"\n![{p.stem}]({p.name})\n" for p in pngs))
    log(f"wrote {out_dir}/results.json, summary.md" + (f" and {len(pngs)} plots" if pngs else
                                                        " (no plots: matplotlib is not installed)"))
    run = start_wandb(wandb, out_dir, out_dir.resolve().name, results["documents"], job_type="eval")
    if run is not None:
        try:
            import wandb as wb
            run.log({"summary": wb.Html(f"<pre>{md}</pre>"), **{p.stem: wb.Image(str(p)) for p in pngs},
                     **scalars(results)})
            run.finish()
        except Exception as e:  # logging must never lose the results already written
            log(f"warning: wandb logging failed ({str(e).splitlines()[0] if str(e) else type(e).__name__})")


def scalars(results):
    """The headline numbers as flat {"label/metric@length": value} (for wandb and quick comparisons)."""
    out = {}
    for k, r in results["models"].items():
        out |= {f"{k}/ppl@{e['window']}": e["ppl"] for e in r.get("ppl", []) if "ppl" in e}
        out |= {f"{k}/short_loss": r["short"]["loss"]} if "short" in r else {}
        out |= {f"{k}/passkey@{e['length']}": e["accuracy"] for e in r.get("passkey", {}).get("by_length", [])
                if "accuracy" in e}
        out |= {f"{k}/recall@{e['distance']}": e["accuracy"] for e in r.get("recall", {}).get("by_distance", [])
                if "accuracy" in e}
    return out


def main(argv=None):
    cfg = parse(EvalConfig, argv, doc=__doc__)
    if not cfg.ckpt:
        raise ConfigError("missing --ckpt: e.g. --ckpt=out/cpu_rope/ckpt.pt,out/cpu_alibi/ckpt.pt")
    from posenc.plots import results_markdown
    results = run_tasks(cfg.ckpt, cfg)
    print(results_markdown(results))
    return results


if __name__ == "__main__":
    cli(main)
