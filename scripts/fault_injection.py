"""Fault injection: kill a tiny training run at random moments; resuming must give exactly the run that was
never stopped.

    python -m scripts.fault_injection                            # 10 trials of each fault (a few minutes on CPU)
    python -m scripts.fault_injection --trials=3 --faults=kill_during_save

Faults: `kill` (SIGKILL at a random moment), `kill_during_save` (SIGKILL while a checkpoint is being written:
the write is slowed down so the moment can be hit), `term` (SIGTERM: train.py saves, exits 143). After each
fault the run is resumed with --resume=true until it finishes (killed again if the fault repeats); then its final
checkpoint is compared tensor by tensor, and metrics.jsonl line by line (kind, step, loss, lr), with a run that
was never stopped. Prints one line per trial and a summary; exits 1 if any trial differs.
"""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from data.prepare import prepare
from posenc.checkpoint import load_checkpoint
from posenc.cli import cli
from posenc.config import check_fields, parse

ROOT = Path(__file__).resolve().parent.parent  # train.py is run from here

FAULTS = ("kill", "kill_during_save", "term")

FLAGS = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--max_iters=24",
         "--warmup_iters=2", "--eval_interval=6", "--eval_iters=2", "--ckpt_interval=4", "--log_interval=1",
         "--dropout=0.1", "--device=cpu"]  # dropout: the RNG state must survive too
# Run train.py with each checkpoint write slowed down (fsync sleeps), so that a kill can land inside one.
SLOW_SAVE = ("import os, sys, time, runpy; fsync = os.fsync; "
             "os.fsync = lambda fd: (time.sleep(0.3), fsync(fd))[1]; "
             "sys.argv = ['train.py'] + sys.argv[1:]; runpy.run_module('train', run_name='__main__')")


def train(out_dir, data_dir, *extra, slow_save=False):
    cmd = [sys.executable, "-c", SLOW_SAVE] if slow_save else [sys.executable, "-m", "train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same arithmetic in every process
    return subprocess.Popen([*cmd, f"--data_dir={data_dir}", f"--out_dir={out_dir}", *FLAGS, *extra], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def metrics(out_dir):
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["kind"], r["step"], r["loss"], r.get("lr")) for r in rows if r["kind"] in ("train", "val")]  # not "ckpt"


def finished(out_dir):
    ckpt = Path(out_dir) / "ckpt.pt"
    return ckpt.exists() and load_checkpoint(ckpt)["step"] == 24


def trial(fault, out_dir, data_dir, rng):
    """Run to the end through faults; returns how many times the run was stopped."""
    stops = 0
    while not finished(out_dir):
        resume = ["--resume=true"] if (Path(out_dir) / "config.json").exists() else []
        proc = train(out_dir, data_dir, *resume, slow_save=fault == "kill_during_save")
        if stops >= 3:  # enough faults: let it finish
            proc.wait()
        elif fault == "kill_during_save":
            while proc.poll() is None and not list(Path(out_dir).glob("ckpt.pt.tmp*")):
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.25))  # somewhere inside the slowed write
            proc.kill()
        else:
            time.sleep(rng.uniform(2.0, 8.0))  # startup is ~2-4 s: some faults land before the first step
            proc.send_signal(signal.SIGKILL if fault == "kill" else signal.SIGTERM)
        code = proc.wait()
        _, err = proc.communicate()
        if code == 0:
            break
        stops += 1
        # SIGTERM: train.py saves and exits 143; before its handlers are in place, the signal ends it (-15)
        expected = {"kill": {-signal.SIGKILL}, "kill_during_save": {-signal.SIGKILL},
                    "term": {128 + signal.SIGTERM, -signal.SIGTERM}}[fault]
        if code not in expected:
            raise RuntimeError(f"{fault}: train.py exited {code}, expected {expected}: {err.strip()[-300:]}")
    return stops


def same_run(a, b):
    """'' if the two runs are the same to the bit (weights, optimizer step, metrics), else what differs."""
    ca, cb = load_checkpoint(Path(a) / "ckpt.pt"), load_checkpoint(Path(b) / "ckpt.pt")
    diff = [k for k in ca["model"] if not torch.equal(ca["model"][k], cb["model"][k])]
    if diff:
        return f"weights differ: {', '.join(diff[:3])}"
    if metrics(a) != metrics(b):
        return "metrics.jsonl differs"
    return ""


def main(trials=10, faults=FAULTS, seed=0, work=None):
    work = Path(work or tempfile.mkdtemp(prefix="faults"))
    data = work / "data"
    if not (data / "meta.json").exists():
        prepare(os.path.join(sysconfig.get_paths()["stdlib"], "email", "*.py"), data, val_fraction=0.2, quiet=True)
    reference = work / "reference"
    if not finished(reference) and train(reference, data, "--overwrite=true").wait() != 0:
        raise RuntimeError("the uninterrupted reference run failed")
    rng, results = random.Random(seed), {}
    for fault in faults:
        for t in range(trials):
            out = work / f"{fault}{t}"
            shutil.rmtree(out, ignore_errors=True)  # each trial starts with a fresh folder
            stops = trial(fault, out, data, rng)
            verdict = same_run(reference, out)
            results.setdefault(fault, []).append(not verdict)
            print(f"{fault} trial {t}: stopped {stops}x, {'identical' if not verdict else verdict}", flush=True)
    for fault, ok in results.items():
        print(f"{fault}: {sum(ok)}/{len(ok)} resumed runs identical to the uninterrupted one")
    return results


@dataclass
class FaultConfig:
    trials: int = 10  # per fault
    faults: tuple[str, ...] = FAULTS
    seed: int = 0  # of the random moments
    work: str = ""  # folder for the runs ("": a new temporary one)

    def __post_init__(self):
        check_fields(self)
        if set(self.faults) - set(FAULTS):
            raise ValueError(f"bad value {self.faults} for config key 'faults': choose from {', '.join(FAULTS)}")


if __name__ == "__main__":
    cfg = cli(lambda argv: parse(FaultConfig, argv, doc=__doc__))
    out = main(cfg.trials, cfg.faults, cfg.seed, cfg.work or None)
    sys.exit(0 if all(all(v) for v in out.values()) else 1)
