"""Jobs: command lines of the pipeline's scripts run as units of work, one after another in this process or
several at once as subprocesses (a CUDA device each, or a share of the CPU cores), each as soon as what it
needs is done. scripts/sweep.py and reproduce.py run their training, fine-tuning and evaluation through it.

    run_jobs([Job("train rope", [(train.main, ["configs/cpu.toml", "--pos_encoding=rope"])]),
              Job("extend rope", [(extend_context.main, [...])], after=("train rope",))], workers=0)

A command is a stage's main(argv) and its arguments: called here in this process, or run as `python -m
<its module>` in a subprocess. The library never imports a stage; the caller hands its main over.

An interrupt (Ctrl-C, SIGTERM) reaches every running job, each saves a checkpoint at its next step, and it
is raised (exit 130 or 143): a job is never reported finished unless it was.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import typing
from dataclasses import dataclass
from pathlib import Path

from posenc.cli import Interrupted, TrainingError

ROOT = Path(__file__).resolve().parent.parent  # the repository: a subprocess imports the stages from here


@dataclass
class Job:
    """Command lines run one after another, as one unit of work (a run: train, then evaluate)."""
    name: str
    commands: list  # [(main, argv), ...]: a stage's main(argv), e.g. train.main
    on_done: typing.Callable = lambda seconds: None  # called with the job's wall time once every command succeeded
    after: tuple = ()  # names of jobs that must finish first (a fine-tune after the training it starts from)
    run_dir: str = ""  # the run folder it trains: its metrics.jsonl shows the job's progress
    steps: int = 0  # the optimizer steps it runs in all (0: unknown)
    kind: str = ""  # jobs of one kind take about as long a step (training at L, fine-tuning at 4L)


PROGRESS_EVERY = 30.0  # seconds between progress lines of parallel jobs


def progress(job: Job) -> dict | None:
    """The last training line of the job's metrics.jsonl (step, loss, tokens/s, ms/step), or None yet."""
    path = Path(job.run_dir) / "metrics.jsonl" if job.run_dir else None
    if path is None or not path.exists():
        return None
    last = None
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if record.get("kind") == "train":
            last = record
    return last


def minutes(seconds: float | None) -> str:
    return "?" if seconds is None else f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def progress_lines(active: list[Job], waiting: list[Job], n_slots: int) -> list[str]:
    """One line per running job (step / total, loss, tokens/s, time left in it), then the time left for every
    job still to run: its steps times the step time measured for its kind, shared by the slots (and never less
    than the longest job's)."""
    now = {job.name: progress(job) for job in active}
    ms = {}  # kind -> measured ms per step
    for job in active:
        if now[job.name] and job.kind:
            ms.setdefault(job.kind, now[job.name]["ms_per_step"])
    lines, left, longest, unknown = [], 0.0, 0.0, False
    for job in active + waiting:
        p = now.get(job.name)
        step = p["step"] if p else 0
        per_step = (p["ms_per_step"] if p else ms.get(job.kind)) if job.steps else None
        eta = None if per_step is None else (job.steps - step) * per_step / 1000
        if eta is None:
            unknown = True
        else:
            left, longest = left + eta, max(longest, eta)
        if job in active:
            what = (f"step {step}/{job.steps} | loss {p['loss']:.3f} | {p['tokens_per_sec']:,.0f} tok/s | "
                    f"{minutes(eta)} left" if p else "starting")
            lines.append(f"[{job.name}] {what}")
    n = len(active) + len(waiting)
    if n and left == 0 and unknown:
        lines.append(f"{n} job(s) to run on {n_slots} slots; time left: no step time measured yet")
    elif n:
        lines.append(f"~ {minutes(max(left / n_slots, longest))} of training left for {n} job(s) on {n_slots} slots"
                     + (", and more: some step times are not measured yet" if unknown else ""))
    return lines


def run_jobs(jobs: list[Job], workers: int = 1) -> list[str]:
    """Run jobs in this process one after another (workers 1, in the order given, which must put a job after
    the ones it needs), or as subprocesses, one per slot (a CUDA device, or a share of the CPU cores), each
    job as soon as a slot is free and what it needs is done. A failed job is reported and the others go on (a
    job that needs it fails too); an interrupt stops every job at its next step (each saves a checkpoint)
    and is raised. Returns the names of the failed jobs."""
    slots = _slots(workers) if workers != 1 and len(jobs) > 1 else [{}]
    if len(slots) > 1:
        return _run_parallel(jobs, slots)
    failed = []
    for job in jobs:
        if set(job.after) & set(failed):
            print(f"error: {job.name} not run: {', '.join(set(job.after) & set(failed))} failed", file=sys.stderr)
            failed.append(job.name)
            continue
        t0 = time.time()
        try:
            for main, argv in job.commands:
                main(argv)
        except (ValueError, OSError, TrainingError) as e:
            print(f"error: {job.name} failed: {e}", file=sys.stderr)
            failed.append(job.name)
            continue
        job.on_done(time.time() - t0)
    return failed


CPU_WORKERS = 2  # workers=0 on a CPU: two runs at once, each on half the cores (small models use 2 threads
#                 poorly: two 1-thread runs on 2 cores train 1.23x faster than one 2-thread run)


def _slots(workers: int) -> list[dict]:
    """Environment overrides, one per parallel slot: a CUDA device each, or on a CPU a share of the cores."""
    import torch
    if torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(torch.cuda.device_count()))))
        devices = [d for d in visible.split(",") if d.strip()]
        n = len(devices) if workers == 0 else workers
        return [{"CUDA_VISIBLE_DEVICES": devices[i % len(devices)]} for i in range(n)]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    n = min(CPU_WORKERS, cores) if workers == 0 else workers
    threads = str(max(1, cores // n))
    return [{"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads} for _ in range(n)]


@dataclass
class _Running:
    job: Job
    left: list  # commands still to run
    process: subprocess.Popen | None = None
    started: float = 0.0


def _relay(stream, prefix):
    """Each line a run prints, prefixed with its name (several runs print at once)."""
    for line in stream:
        print(prefix + line, end="", flush=True)


def _start(run: _Running, env: dict) -> None:
    main, argv = run.left.pop(0)
    run.started = run.started or time.time()
    print(f"[{run.job.name}] python -m {main.__module__} {' '.join(argv)}", flush=True)
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    run.process = subprocess.Popen([sys.executable, "-m", main.__module__, *argv],
                                   env=os.environ | env | {"PYTHONUNBUFFERED": "1", "PYTHONPATH": path},
                                   stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
    threading.Thread(target=_relay, args=(run.process.stdout, f"[{run.job.name}] "), daemon=True).start()


def _run_parallel(jobs: list[Job], slots: list[dict]) -> list[str]:
    queue, active, done, failed = list(jobs), {}, set(), []  # active: slot -> _Running
    shown = time.time()
    try:
        while queue or active:
            if time.time() - shown >= PROGRESS_EVERY:
                shown = time.time()
                for line in progress_lines([r.job for r in active.values()], queue, len(slots)):
                    print(f"progress {line}", flush=True)
            for job in [j for j in queue if set(j.after) & set(failed)]:
                print(f"error: {job.name} not run: {', '.join(set(job.after) & set(failed))} failed", file=sys.stderr)
                failed.append(job.name)
                queue.remove(job)
            for slot in range(len(slots)):
                ready = [j for j in queue if set(j.after) <= done]
                if slot not in active and ready:
                    queue.remove(ready[0])
                    active[slot] = _Running(ready[0], list(ready[0].commands))
                    _start(active[slot], slots[slot])
            if not active and queue:
                raise ValueError(f"jobs wait for jobs that are not in the list: {[j.name for j in queue]}")
            time.sleep(0.2)
            for slot, run in list(active.items()):
                rc = run.process.poll()
                if rc is None:
                    continue
                if rc in (128 + signal.SIGINT, 128 + signal.SIGTERM):  # a run was interrupted: stop them all
                    raise Interrupted(rc - 128, f"{run.job.name} was interrupted")
                if rc != 0:
                    print(f"error: {run.job.name} failed (exit {rc})", file=sys.stderr)
                    failed.append(run.job.name)
                    del active[slot]
                elif run.left:
                    _start(run, slots[slot])
                else:
                    run.job.on_done(time.time() - run.started)
                    done.add(run.job.name)
                    del active[slot]
    except (KeyboardInterrupt, Interrupted) as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        running = [r.process for r in active.values() if r.process is not None and r.process.poll() is None]
        for proc in running:
            proc.send_signal(signum)  # each saves a checkpoint at its next step
        for proc in running:
            proc.wait()
        raise
    return failed
