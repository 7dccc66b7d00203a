"""The command-line wrapper every script shares: a bad value, a missing file or a failed stage is one line
`error: ...` and exit 1; Ctrl-C or SIGTERM is one line and exit 130 or 143."""
import signal
import sys
import threading


class TrainingError(RuntimeError):
    """A run that could not finish what it was asked (a diverged loss, a checkpoint that could not be saved, a
    failed stage), said in one line."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM stopped the work early; the message says what was kept. Exit status 128 + signal
    (130 for SIGINT, 143 for SIGTERM), as shells report a process killed by that signal."""

    def __init__(self, signum, message="interrupted"):
        super().__init__(message)
        self.signum = signum


def _raise_interrupted(signum, frame):
    raise Interrupted(signum, f"stopped by {signal.Signals(signum).name}")


def cli(main, argv=None, errors=(ValueError, OSError, RuntimeError)):
    """Run a script's main(argv): a ConfigError or any of `errors` is one line `error: ...` and exit 1; an
    interrupt (Ctrl-C, or SIGTERM, which raises Interrupted here) is one line and exit 130 or 143."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        return main(sys.argv[1:] if argv is None else argv)
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        raise SystemExit(128 + e.signum) from None
    except KeyboardInterrupt:
        print("interrupted: stopped by SIGINT", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None
    except errors as e:
        raise SystemExit(f"error: {e}") from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
