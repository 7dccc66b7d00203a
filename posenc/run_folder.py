"""A run folder is owned: one live process writes it, and a finished or interrupted run is never silently reused.

    with claim("out/cpu_rope", resume=False, overwrite=False):   # refuses a folder that holds a run
        ...train, writing ckpt.pt, metrics.jsonl, config.json...

The lock is a file holding the owner's pid and host; a lock whose process is gone (killed with SIGKILL) is
stale and taken over, and so are the temporary checkpoint files such a process left behind.
"""
import errno
import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path

LOCK = "run.lock"
# What makes a folder hold a run (or an evaluation, or an explanation):
RUN_FILES = ("ckpt.pt", "metrics.jsonl", "config.json", "results.json", "explain.json")


class RunFolderError(ValueError):
    """A run folder that is in use or holds a run this command would replace, said in one line."""


def holds_run(out_dir) -> list[str]:
    """The files that make out_dir hold a run (empty: a fresh folder)."""
    return [name for name in RUN_FILES if (Path(out_dir) / name).exists()]


@contextmanager
def claim(out_dir, resume: bool, overwrite: bool, what: str = "run"):
    """Own out_dir for the duration: refuse it while another live process owns it; refuse a folder that holds a
    run unless resuming it or asked to overwrite it (call clear() once every check has passed)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = _take_lock(out_dir)
    try:
        _remove_stale_temp_files(out_dir)
        existing = holds_run(out_dir)
        if existing and not resume and not overwrite:
            raise RunFolderError(f"{out_dir} holds an earlier {what} ({', '.join(existing)}): continue it with "
                                 "--resume=true, replace it with --overwrite=true, or choose another --out_dir")
        yield out_dir
    finally:
        _release_lock(lock)


def clear(out_dir) -> None:
    """Remove the run files of an earlier run (asked for with --overwrite), right before the new run writes:
    after its checks, so a bad value never costs the old run."""
    for name in holds_run(out_dir):
        (Path(out_dir) / name).unlink()



class WriteError(OSError):
    """A file that could not be written, said in one line (a full disk: how much was needed, how much is free)."""


def why_not_written(error: BaseException, folder, needed: int) -> str:
    """Why writing `needed` bytes into `folder` failed, in words a person acts on. A full disk is said as such, with
    what was needed and what is free (shutil.disk_usage), also when the writer words it its own way (torch's zip
    writer: "unexpected pos ...")."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    if getattr(error, "errno", None) == errno.ENOSPC or (free is not None and free < needed):
        have = f"{size_text(free)} is free" if free is not None else "the free space is unknown"
        return f"no space left on the device of {folder}: it needs about {size_text(needed)} and {have}"
    return " ".join(str(error).split()) or type(error).__name__


def size_text(n: int) -> str:
    """A byte count as a person reads it: 15.8 MB, 8.2 kB, 512 bytes."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def write_atomic(path, text: str) -> None:
    """Write a text file through a temporary file and a rename: a signal or crash in the middle leaves the old
    file or the new one, never half of one (leftover temporary files go at the next claim). A failed write
    removes its temporary file and raises WriteError (one line)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise WriteError(f"could not write {path}: {why_not_written(e, path.parent, len(text.encode()))}") from e


def _take_lock(out_dir: Path) -> Path:
    lock, me = out_dir / LOCK, f"{os.getpid()} {socket.gethostname()}"
    for _ in range(2):  # a second try after removing a stale lock
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            owner = _read(lock)
            if owner is not None and _alive(owner):
                pid, host = owner
                raise RunFolderError(f"{out_dir} is in use by process {pid} on {host}; if that process is gone, "
                                     f"delete {lock}") from None
            lock.unlink(missing_ok=True)  # its process is gone (or the file is unreadable): stale
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me + "\n")
        return lock
    raise RunFolderError(f"could not lock {out_dir}: another process is taking it at the same time")


def _release_lock(lock: Path) -> None:
    if _read(lock) == (os.getpid(), socket.gethostname()):
        lock.unlink(missing_ok=True)


def _read(lock: Path):
    try:
        pid, host = lock.read_text().split()
        return int(pid), host
    except (OSError, ValueError):
        return None


def _alive(owner) -> bool:
    pid, host = owner
    if host != socket.gethostname():
        return True  # another machine's process: assume it lives
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temp_files(out_dir: Path) -> None:
    """save_checkpoint and write_atomic write <name>.tmp<pid>, then rename it: leftovers of dead processes go."""
    for tmp in out_dir.glob("*.tmp*"):
        pid = tmp.name.rpartition(".tmp")[2]
        if pid.isdigit() and not _alive((int(pid), socket.gethostname())):
            tmp.unlink(missing_ok=True)
