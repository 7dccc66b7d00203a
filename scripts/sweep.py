"""Sweeps: a grid over any train.py config fields and seeds; every run trained and evaluated, and one summary
of mean ± standard deviation over seeds.

    python -m scripts.sweep configs/cpu.toml --pos_encoding=rope,alibi,learned --seed=0,1,2
    python -m scripts.sweep configs/cpu.toml --pos_encoding=rope,alibi --rope_theta=1e4,5e5 --seed=0,1,2 --max_iters=300
    python -m scripts.sweep configs/gpu30m.toml --pos_encoding=rope,alibi,learned --seed=0,1,2 --workers=0   # a run per GPU

A train.py flag whose value has commas is an axis of the grid (dict and list values never are); every other
flag applies to every run, and every combination is checked before the first run starts. Each run trains in
<sweep_dir>/<key=value>__<key=value>..., named from its swept values, then evaluate.py writes <run>/eval.
Interrupted (Ctrl-C, SIGTERM: exit 130 or 143) and run again, the sweep skips finished runs and resumes the
interrupted one from its checkpoint. summary.md and summary.json give, per setting (the swept values but the
seed), the mean, standard deviation and number n over seeds of the validation loss and of every evaluation
number, and each run's steps, tokens and training time (schemes compared at equal compute).
"""

import json
import re
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import evaluate
import train
from posenc.cli import cli
from posenc.config import ConfigError, at_least, check_fields, key_types, parse, split_argv
from posenc.data import load_meta
from posenc.eval_tasks import TASKS
from posenc.jobs import Job, run_jobs
from posenc.run_folder import RunFolderError, holds_run, write_atomic
from posenc.run_stats import aggregate, compute

SEED = "seed"  # the axis that is averaged over
SEP = "__"  # between key=value pairs in a run's folder name
RECORD = "sweep_run.json"  # written into a run's folder when it is trained and evaluated: it is finished
NOT_SWEPT = ("out_dir", "resume", "overwrite")  # the sweep sets these for each run


@dataclass
class SweepConfig:
    sweep_dir: str = "runs/sweep_{config}"  # a folder per run inside; {config}: the TOML file's name
    workers: int = 0  # runs at once; 0: one per visible CUDA device, or 2 on a CPU (each with half its cores)
    evaluate: bool = True  # evaluate every run with evaluate.py (into <run>/eval)
    eval_len: int | None = None  # evaluate.py --max_len; None: 8 x the run's block_size
    eval_tasks: tuple[str, ...] = ("position", "ppl", "short")  # tasks of posenc/eval_tasks.py (also passkey, recall)
    eval_docs: int = 12  # evaluate.py --n_docs: long val documents per run

    def __post_init__(self):
        check_fields(self)
        at_least(self, 0, "workers")
        at_least(self, 1, "eval_len", "eval_docs")
        if not self.eval_tasks or set(self.eval_tasks) - set(TASKS):
            raise ConfigError(f"bad value {','.join(self.eval_tasks)!r} for config key 'eval_tasks': choose from "
                              f"{', '.join(TASKS)}")


class SweepError(RuntimeError):
    """Some runs of a sweep failed (the others finished and are summarized)."""


@dataclass(frozen=True)
class Run:
    name: str  # its folder: every swept key=value
    setting: str  # the swept values but the seed: the group its seeds are averaged in
    values: dict  # swept key -> value (as given on the command line)
    flags: tuple  # its train.py flags: the fixed ones, its values and its folder
    cfg: train.TrainConfig  # checked before any run starts

    @property
    def dir(self) -> Path:
        return Path(self.cfg.out_dir)


# ----------------------------------------------------------------------------- the grid

def _sweepable(tp) -> bool:
    """Only scalar keys are axes: a dict or list value (rope_scaling) may itself hold commas."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return all(_sweepable(a) for a in typing.get_args(tp) if a is not type(None))
    return (typing.get_origin(tp) or tp) in (bool, int, float, str, typing.Literal)


def split_grid(flags: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """(axes: key -> values, fixed flags) from train.py flags given as --key=value."""
    types, axes, fixed = key_types(train.TrainConfig), {}, []
    for flag in flags:
        key, _, value = flag[2:].partition("=")
        if key in NOT_SWEPT:
            raise ConfigError(f"scripts/sweep.py sets --{key} for each run itself: give --sweep_dir instead")
        if "," not in value or not _sweepable(types[key]):
            fixed.append(flag)
            continue
        values = [v.strip() for v in value.split(",") if v.strip()]
        if len(set(values)) != len(values):
            raise ConfigError(f"bad value {value!r} for config key '{key}': a value is repeated")
        axes[key.rpartition(".")[2]] = values
    return axes, fixed


def expand(axes: dict[str, list]) -> list[dict]:
    """Every combination of the axes' values, in the order given (the last axis varies fastest)."""
    combos = [{}]
    for key, values in axes.items():
        combos = [c | {key: v} for c in combos for v in values]
    return combos


def _safe(value) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "-", str(value))


def run_name(values: dict, skip=()) -> str:
    """'key=value__key=value' for the swept values (a folder name; characters outside [A-Za-z0-9._+-] as '-')."""
    return SEP.join(f"{k}={_safe(v)}" for k, v in values.items() if k not in skip)


def plan(file: str | None, fixed: list[str], axes: dict[str, list[str]], sweep_dir) -> list[Run]:
    """The runs of the grid, each config checked now (a typo or bad value fails before anything trains)."""
    runs, base = [], [file] if file else []
    for values in expand(axes):
        name = run_name(values) or "run"
        flags = [*fixed, *(f"--{k}={v}" for k, v in values.items()), f"--out_dir={Path(sweep_dir) / name}"]
        runs.append(Run(name, run_name(values, skip=(SEED,)) or "all", values, tuple(flags),
                        train.load_config([*base, *flags])))
    if len({r.name for r in runs}) != len(runs):
        raise ConfigError(f"two runs of this grid get the same folder name: {sorted(r.name for r in runs)}")
    for data_dir in {r.cfg.data_dir for r in runs}:
        load_meta(data_dir)  # data that is not there fails now, in one line, not at the first run's start
    return runs


def claim_sweep(sweep_dir, file, fixed, axes) -> None:
    """sweep.json names what the sweep is; a folder that holds another sweep (other file or fixed flags) is
    refused, while new values on the axes of the same sweep extend it."""
    manifest, path = {"config": file, "fixed": fixed}, Path(sweep_dir) / "sweep.json"
    if path.exists():
        old = json.loads(path.read_text())
        if {k: old.get(k) for k in manifest} != manifest:
            raise RunFolderError(f"{sweep_dir} holds another sweep (config {old.get('config')}, flags "
                                 f"{' '.join(old.get('fixed', []))}): choose another --sweep_dir")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest | {"axes": axes}, indent=1) + "\n")


# ----------------------------------------------------------------------------- running

def commands(run: Run, cfg: SweepConfig, file: str | None, group: str) -> list[tuple[str, list[str]]]:
    """What one run is: the train.py and evaluate.py command lines (resuming where a run was started)."""
    train_argv = [*([file] if file else []), *run.flags, f"--wandb_group={group}"]
    if holds_run(run.dir):
        train_argv.append("--resume=true")  # an interrupted run continues; a finished one returns at once
    out = [(train.main, train_argv)]
    if cfg.evaluate:
        max_len = cfg.eval_len or 8 * run.cfg.model.block_size
        out.append((evaluate.main, [f"--ckpt={run.dir / 'ckpt.pt'}", f"--data_dir={run.cfg.data_dir}",
                                    f"--max_len={max_len}", f"--tasks={','.join(cfg.eval_tasks)}",
                                    f"--n_docs={cfg.eval_docs}", f"--out_dir={run.dir / 'eval'}", "--resume=true",
                                    f"--device={run.cfg.device}"]))
    return out


# ----------------------------------------------------------------------------- summary

def record(run: Run, seconds: float | None = None) -> dict:
    """What a finished run is summarized by: its settings, compute and numbers (written to its folder)."""
    c = compute(run.dir)
    out = {"name": run.name, "setting": run.setting, "values": run.values, "steps": c["steps"], "tokens": c["tokens"],
           "train_seconds": c["train_seconds"], "wall_seconds": seconds, "numbers": {"val_loss": c["val_loss"]}}
    results = run.dir / "eval" / "results.json"
    if results.exists():
        scalars = evaluate.scalars(json.loads(results.read_text()))
        out["numbers"] |= {k.partition("/")[2]: v for k, v in scalars.items()}
    write_atomic(run.dir / RECORD, json.dumps(out, indent=1) + "\n")  # last: it says the run is finished
    return out


def summarize(records: list[dict]) -> dict:
    """setting -> {"runs": names, "seeds", and for compute and every number: aggregate over its runs}."""
    out = {}
    for rec in records:
        out.setdefault(rec["setting"], []).append(rec)
    summary = {}
    for setting, recs in out.items():
        keys = list(dict.fromkeys(k for r in recs for k in r["numbers"]))
        summary[setting] = {"runs": [r["name"] for r in recs], "seeds": [r["values"].get(SEED) for r in recs],
                            **{k: aggregate([r[k] for r in recs]) for k in ("steps", "tokens", "train_seconds")},
                            "numbers": {k: aggregate([r["numbers"].get(k) for r in recs]) for k in keys}}
    return summary


def fmt(agg: dict, digits: int = 3) -> str:
    """'mean ± std (n)'; without a spread 'mean (n=1)'; '—' with no value."""
    if agg["mean"] is None:
        return "—"
    if agg["std"] is None:
        return f"{agg['mean']:.{digits}f} (n={agg['n']})"
    return f"{agg['mean']:.{digits}f} ± {agg['std']:.{digits}f} ({agg['n']})"


def sweep_markdown(summary: dict, title: str) -> str:
    numbers = list(dict.fromkeys(k for s in summary.values() for k in s["numbers"]))
    header = ["setting", "seeds", "steps", "tokens", "train s", *numbers]
    lines = [f"# {title}", "",
             "Per setting: mean ± sample standard deviation over seeds (n). val_loss: the last validation loss; "
             "ppl@W: sliding-window perplexity at window W; short_loss: loss at the base length; passkey@N, "
             "recall@d: accuracies (evaluate.py). steps, tokens and seconds in optimizer steps (means over seeds) show the "
             "compute of each.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for setting, s in summary.items():
        row = [setting, ",".join(str(x) for x in s["seeds"]), f"{s['steps']['mean']:.0f}",
               f"{s['tokens']['mean']:,.0f}", f"{s['train_seconds']['mean']:.1f}"]
        row += [fmt(s["numbers"][k], 2 if k.startswith("ppl") else 4) if k in s["numbers"] else "—" for k in numbers]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the command

def sweep(file: str | None, cfg: SweepConfig, train_flags: list[str]) -> dict:
    """Train and evaluate every run of the grid (skipping finished ones), then write summary.md/.json."""
    axes, fixed = split_grid(train_flags)
    sweep_dir = Path(cfg.sweep_dir.format(config=Path(file).stem if file else "run"))
    runs = plan(file, fixed, axes, sweep_dir)
    claim_sweep(sweep_dir, file, fixed, axes)
    print(f"sweep {sweep_dir}: {len(runs)} runs over {', '.join(f'{k} ({len(v)})' for k, v in axes.items()) or 'no axis'}")
    jobs = []
    for run in runs:
        if (run.dir / RECORD).exists():
            print(f"{run.name}: finished in an earlier sweep, skipped")
            continue
        jobs.append(Job(run.name, commands(run, cfg, file, sweep_dir.name), lambda seconds, r=run: record(r, seconds)))
    failed = run_jobs(jobs, cfg.workers)
    records = [json.loads((r.dir / RECORD).read_text()) for r in runs if (r.dir / RECORD).exists()]
    summary = summarize(records)
    md = sweep_markdown(summary, f"Sweep {sweep_dir.name}")
    (sweep_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (sweep_dir / "summary.md").write_text(md)
    print(md)
    print(f"wrote {sweep_dir / 'summary.md'}")
    if failed:
        raise SweepError(f"{len(failed)} of {len(runs)} runs failed ({', '.join(failed)}); fix the cause and run the "
                         "same command again: finished runs are skipped")
    return summary


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        parse(SweepConfig, ["--help"], passthrough=train.TrainConfig, doc=__doc__)
    types = key_types(SweepConfig) | key_types(train.TrainConfig)
    files, flags = split_argv(argv, types)  # the TOML file is train.py's, not the sweep's
    if len(files) > 1:
        raise ConfigError(f"give one config file, not {len(files)}: {' '.join(files)}")
    cfg, train_flags = parse(SweepConfig, [f"--{k}={v}" for k, v in flags.items()], passthrough=train.TrainConfig,
                             doc=__doc__)
    return sweep(files[0] if files else None, cfg, train_flags)


if __name__ == "__main__":
    cli(main, errors=(ValueError, OSError, train.TrainingError, SweepError))
