"""Every command line, given bad input, fails with exit status 1 and one line that names the problem, and an
existing run's files stay byte for byte what they were."""
import hashlib
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import evaluate
import extend_context
import reproduce
import sample
import train
from data.prepare import prepare
from posenc.cli import cli
from scripts import bench_decode, bench_model, sweep

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=2", "--max_iters=2",
        "--eval_iters=1", "--eval_interval=2", "--device=cpu"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished tiny run, its data, and data tokenized with another (compact) vocabulary."""
    root = tmp_path_factory.mktemp("cli")
    email = os.path.join(sysconfig.get_paths()["stdlib"], "email", "*.py")
    prepare(email, root / "data", val_fraction=0.2, quiet=True)
    prepare(email, root / "data8k", val_fraction=0.2, vocab_size=512, quiet=True)
    train.main([f"--data_dir={root / 'data'}", f"--out_dir={root / 'run'}", *TINY])
    return root


def digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


CASES = [  # (script, arguments with {run} and {root} filled in, what the one line says)
    (train, ["--batch_size=-1"], "config key 'batch_size': expected a number >= 1"),
    (train, ["--batch_size=0"], "config key 'batch_size': expected a number >= 1"),
    (train, ["--grad_accum_steps=0"], "config key 'grad_accum_steps': expected a number >= 1"),
    (train, ["--max_iters=-5"], "config key 'max_iters': expected a number >= 0"),
    (train, ["--eval_iters=0"], "config key 'eval_iters': expected a number >= 1"),
    (train, ["--learning_rate=nan"], "config key 'learning_rate': expected a finite number"),
    (train, ["--device=bogus"], "config key 'device': expected auto, cpu, cuda, cuda:N or mps"),
    (train, ["--device=cuda:7"], "is not available on this machine"),
    (train, ["--vocab_size=100", "--overwrite=true"], "has 50257 token ids; expected a number >= 50257"),
    (train, ["--n_layr=2"], "unknown config key 'n_layr' (did you mean 'n_layer'?)"),
    (train, [], "holds an earlier run (ckpt.pt, metrics.jsonl, config.json): continue it with --resume=true"),
    (train, ["--resume=true", "--n_layer=2"], "with another architecture: n_layer=2 (the checkpoint has 1)"),
    (train, ["--resume=true", "--data_dir={root}/data8k"], "on other data"),
    (train, ["--init_from={root}/missing.pt", "--out_dir={root}/new"], "no checkpoint at"),
    (extend_context, ["--factor=inf"], "config key 'factor': expected a finite number"),
    (extend_context, ["--factor=nan"], "config key 'factor': expected a finite number"),
    (extend_context, ["--factor=0.5"], "config key 'factor': expected a number >= 1"),
    (extend_context, ["--method=longer", "--factor=2"], "config key 'method': choose one of linear, ntk"),
    (extend_context, ["--factor=2", "--stpes=3"], "unknown config key 'stpes' (did you mean 'steps'?)"),
    (extend_context, ["--factor=2", "--block_size=64"], "extend_context.py sets block_size itself"),
    (extend_context, ["--factor=2", "--out_dir={run}"], "holds an earlier extension"),
    (extend_context, ["--factor=2", "--steps=1", "--data_dir={root}/data8k", "--out_dir={root}/ext8k"],
     "was trained on another vocabulary"),
    (sample, ["--top_k=0"], "config key 'top_k': expected a number >= 1"),
    (sample, ["--top_k=-3"], "config key 'top_k': expected a number >= 1"),
    (sample, ["--top_p=0"], "config key 'top_p': expected a number in (0, 1]"),
    (sample, ["--max_new_tokens=-5"], "config key 'max_new_tokens': expected a number >= 1"),
    (sample, ["--temperature=-1"], "config key 'temperature': expected a number >= 0"),
    (sample, ["--prompt_file={root}/missing.txt"], "cannot read prompt file"),
    (evaluate, ["--max_len=16"], "max_len=16 is shorter than the base length L=32"),
    (evaluate, ["--max_len=0"], "config key 'max_len': expected a number >= 1"),
    (evaluate, ["--tasks=position,wall"], "config key 'tasks': choose from position, ppl"),
    (evaluate, ["--data_dir={root}/data8k"], "was trained on another vocabulary"),
    (evaluate, ["--out_dir={run}"], "holds an earlier evaluation"),
    (evaluate, ["--n_docs=4"], "has 3 held-out (val) documents of >= 65 tokens, fewer than --n_docs=4"),
    (reproduce, ["--scale", "tpu"], "config key 'scale': choose cpu, cpu4k, cpu-quick, gpu"),
    (reproduce, ["--scal=gpu"], "unknown config key 'scal' (did you mean 'scale'?)"),
    (reproduce, ["--seeds=0"], "config key 'seeds': expected a number >= 1"),
    (sweep, ["--pos_encoding=rope,rotary"], "unknown pos_encoding 'rotary'"),
    (sweep, ["--seed=0,1,0"], "config key 'seed': a value is repeated"),
    (sweep, ["--out_dir={root}/x"], "scripts/sweep.py sets --out_dir for each run itself"),
    (sweep, ["--max_iter=3"], "unknown config key 'max_iter' (did you mean 'max_iters'?)"),
    (sweep, ["--eval_tasks=ppl,wall"], "config key 'eval_tasks': choose from position, ppl"),
    (sweep, ["--workers=-1"], "config key 'workers': expected a number >= 0"),
    (sweep, ["--data_dir={root}/nodata"], "no prepared data at"),
    (bench_model, ["--schemes=rotary"], "unknown pos_encoding 'rotary'"),
    (bench_model, ["--T=0"], "config key 'T': expected a number >= 1"),
    (bench_decode, ["--contexts=0"], "config key 'contexts': expected positive lengths"),
    (bench_decode, ["--new_tokens=1"], "config key 'new_tokens': expected a number >= 2"),
]
COMMON = {  # what each script needs besides the bad value
    train: ["--data_dir={root}/data", "--out_dir={run}", *TINY],
    extend_context: ["--ckpt={run}/ckpt.pt", "--method=linear", "--out_dir={root}/ext"],
    sample: ["--ckpt={run}/ckpt.pt", "--prompt=hi"],
    evaluate: ["--ckpt={run}/ckpt.pt", "--data_dir={root}/data", "--max_len=64", "--n_docs=2",  # val holds 3
               "--out_dir={root}/eval"],
    sweep: ["--data_dir={root}/data", "--sweep_dir={root}/sweep", *TINY],
}


@pytest.mark.parametrize("script, argv, message", CASES, ids=[f"{s.__name__}{a}" for s, a, _ in CASES])
def test_bad_input_is_one_line_and_loses_nothing(script, argv, message, run, capsys):
    before = digest(run / "run")
    fill = {"run": run / "run", "root": run}
    args = [a.format(**fill) for a in COMMON.get(script, []) + argv]  # later flags win
    with pytest.raises(SystemExit) as e:
        cli(script.main, args, errors=(ValueError, OSError, RuntimeError))
    text = str(e.value.code)
    assert text.startswith("error: ") and message in text and "\n" not in text, text
    assert digest(run / "run") == before


@pytest.mark.parametrize("command, argv", [("train.py", ["--batch_size=0"]), ("extend_context.py", ["--factor=nan"]),
                                           ("sample.py", ["--top_p=0"]), ("evaluate.py", ["--max_len=0"]),
                                           ("reproduce.py", ["--scale", "tpu"]), ("-m scripts.sweep", ["--seed=1,x"]),
                                           ("data/prepare.py", [])])  # by path: says to run it as a module
def test_the_real_command_lines_exit_1_without_a_traceback(command, argv, tmp_path):
    """As a user types them: a stage by its file from another folder, a script as a module from the root."""
    cmd = command.split() if command.startswith("-m") else [str(ROOT / command)]
    proc = subprocess.run([sys.executable, *cmd, *argv], capture_output=True, text=True,
                          cwd=ROOT if command.startswith("-m") else tmp_path, timeout=120)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
