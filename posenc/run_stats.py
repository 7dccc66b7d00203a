"""Statistics over runs: mean ± std over seeds, whether two settings differ by more than their seed spread,
several seeds' evaluation results merged into one, and a finished training run's compute. scripts/sweep.py and
reproduce.py both report with them."""
import copy
import json
import math
from pathlib import Path

from posenc.eval_tasks import TASKS


def aggregate(values) -> dict:
    """mean, sample standard deviation (n - 1 in the denominator; None for fewer than 2) and n of the finite
    values among `values` (None, NaN and inf are left out)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(xs)
    mean = sum(xs) / n if n else None
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n}


def differs(a: dict, b: dict) -> bool | None:
    """Whether two aggregates differ by more than their seed spread: |mean_a - mean_b| > std_a + std_b, i.e.
    their mean ± std intervals do not overlap. None when either has no spread (fewer than 2 seeds)."""
    if a["std"] is None or b["std"] is None:
        return None
    return abs(a["mean"] - b["mean"]) > a["std"] + b["std"]


def merge_seeds(results: list[dict]) -> dict:
    """One evaluation results dict from several seeds' (the same models, tasks and settings): in every task's
    numbers each float is the mean over seeds, with its sample standard deviation beside it as <key>_sd;
    counts, lengths and reasons, and everything outside the tasks (configs, settings), are the first seed's.
    n_seeds says how many were merged."""
    def merge(xs):
        x = xs[0]
        if isinstance(x, float):
            return aggregate(xs)["mean"]
        if isinstance(x, dict):
            out = {}
            for k, v in x.items():
                vs = [y.get(k) if isinstance(y, dict) else None for y in xs]
                out[k] = merge(vs)
                if isinstance(v, float):
                    out[f"{k}_sd"] = aggregate(vs)["std"]
            return out
        if isinstance(x, list) and all(isinstance(y, list) and len(y) == len(x) for y in xs):
            return [merge([y[i] for y in xs]) for i in range(len(x))]
        return x

    out = copy.deepcopy(results[0]) | {"n_seeds": len(results)}
    for label, model in out["models"].items():
        for task in TASKS:
            if task in model:
                model[task] = merge([r["models"][label][task] for r in results])
    return out


def train_seconds(metrics: list[dict]) -> float:
    """Time spent in optimizer steps, from metrics.jsonl's records (so a resumed run counts every part, and
    evaluation and checkpointing are left out); the first step, which may compile, is not timed."""
    total, prev = 0.0, None
    for m in metrics:
        if m.get("kind") == "train":
            steps = m["step"] - (prev if prev is not None else 1)
            total += m["ms_per_step"] / 1000 * max(steps, 1)
            prev = m["step"]
    return total


def compute(run_dir) -> dict:
    """A finished training run's compute and last validation loss, from its folder."""
    info = json.loads((Path(run_dir) / "config.json").read_text())
    config = info["config"]
    metrics = [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    val = [m for m in metrics if m.get("kind") == "val"]
    steps = val[-1]["step"] if val else 0
    T = config.get("pose_window") or config["model"]["block_size"]  # tokens per sequence trained (PoSE: its window)
    tokens = steps * config["batch_size"] * config["grad_accum_steps"] * T * info.get("world_size", 1)
    return {"steps": steps, "tokens": tokens, "train_seconds": round(train_seconds(metrics), 1),
            "val_loss": val[-1]["loss"] if val else None}
