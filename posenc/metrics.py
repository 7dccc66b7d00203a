"""Where a run's numbers go: <out_dir>/metrics.jsonl (one JSON object per line) and, optionally, wandb.

wandb is off by default; `offline` needs no account and no network, and `online` without an API key logs
offline instead of hanging. Logging never loses a result: if wandb cannot start, metrics.jsonl still has it.
"""
import json
import os
import sys
from pathlib import Path

from posenc.run_folder import write_atomic

WANDB_PROJECT = "posenc"


class MetricsLog:
    """Appends {"kind": "train" | "val" | "ckpt" | "ckpt_failed", "step": ..., ...} lines ("ckpt": the checkpoint now
    holds this step; "ckpt_failed": this step could not be saved, kept_step is the one kept); a resumed run first
    drops the lines written after its checkpoint, so every step appears once. Writes nothing on ranks other than 0."""

    def __init__(self, out_dir, resume_step=None, enabled=True, wandb_run=None):
        self.path, self.enabled, self.wandb = Path(out_dir) / "metrics.jsonl", enabled, wandb_run
        if enabled:
            old = self.path.read_text().splitlines() if resume_step is not None and self.path.exists() else []
            write_atomic(self.path, "".join(ln + "\n" for ln in old if _step_of(ln) <= (resume_step or 0)))

    def record(self, **metrics):
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.wandb is not None:
            self.wandb.log({f"{metrics['kind']}/{k}": v for k, v in metrics.items()
                            if k not in ("kind", "step") and v is not None}, step=metrics["step"])

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def start_wandb(mode, out_dir, run_name, config, job_type="train", project=WANDB_PROJECT, group=None):
    """A wandb run, or None when off or unavailable (said on stderr). Runs of one sweep share a `group`."""
    if mode == "off":
        return None
    try:
        import wandb
    except ImportError:
        print(f"warning: wandb={mode} but wandb is not installed (pip install wandb): no wandb logging", file=sys.stderr)
        return None
    if mode == "online" and not _wandb_key():
        print("warning: wandb=online but no API key (WANDB_API_KEY or ~/.netrc): logging offline", file=sys.stderr)
        mode = "offline"
    try:
        return wandb.init(project=project, name=run_name, dir=str(out_dir), mode=mode, config=config,
                          job_type=job_type, group=group or None, settings=wandb.Settings(init_timeout=60))
    except Exception as e:
        print(f"warning: wandb could not start ({str(e).splitlines()[0]}): no wandb logging", file=sys.stderr)
        return None


def _wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False
