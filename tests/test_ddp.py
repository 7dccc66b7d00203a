"""Two processes through torchrun on CPU (gloo): both ranks finish, only rank 0 logs and saves, and no gloo thread
outlives main()."""
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch.distributed as dist

from data.prepare import prepare
from posenc.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def run_two_ranks(tmp_path, script, **flags):
    """script (train.py, or one that calls train.main) on two CPU processes through torchrun, with a tiny model
    on a small corpus; it must exit 0."""
    data = tmp_path / "data"
    prepare(os.path.join(sysconfig.get_paths()["stdlib"], "email", "*.py"), data, val_fraction=0.2, quiet=True)
    flags = dict(data_dir=data, out_dir=tmp_path / "run", device="cpu", n_layer=1, n_head=2, n_embd=32, block_size=32,
                 batch_size=2, warmup_iters=1, eval_iters=1) | flags
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           *(f"--{k}={v}" for k, v in flags.items())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch without gloo")
def test_two_process_ddp_step_on_cpu(tmp_path):
    run_two_ranks(tmp_path, ROOT / "train.py", grad_accum_steps=2, max_iters=3, eval_interval=3, log_interval=1)
    out = tmp_path / "run"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3]  # rank 0 alone writes
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["step"] == 3 and len(ckpt["ranks"]) == 2
    assert not any(p.name.startswith("ckpt.pt.tmp") for p in out.iterdir())
    # both ranks keep their own RNG stream (seeded seed + rank)
    assert not (ckpt["ranks"][0]["rng"]["torch"] == ckpt["ranks"][1]["rng"]["torch"]).all()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch without gloo")
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through Linux's /proc")
def test_ddp_run_joins_the_gloo_threads_before_exit(tmp_path):
    """A gloo thread still alive when the interpreter exits may free its last work then, and take the GIL
    from a finalizing interpreter: SIGABRT, exit code 1, about one two-process run in ten. So main() must
    leave no thread behind: the world group is destroyed, not kept alive by a stray reference."""
    script = tmp_path / "threads_after_main.py"
    script.write_text(
        "import json, os, sys\n"
        "import train\n"
        "def threads():\n"
        "    return sorted(open(f'/proc/self/task/{t}/comm').read().strip() for t in os.listdir('/proc/self/task'))\n"
        "before = threads()\n"
        "train.main(sys.argv[1:])\n"
        "with open(f'threads{os.environ[\"RANK\"]}.json', 'w') as f:\n"  # a file each: the ranks share stdout
        "    json.dump([before, threads()], f)\n")
    run_two_ranks(tmp_path, script, max_iters=1, eval_interval=1)
    for rank in (0, 1):
        before, after = json.loads((tmp_path / f"threads{rank}.json").read_text())
        assert after == before, (rank, before, after)  # e.g. 'pt_gloo_runloop' left running
