"""The `proclock` command line: run a command under a lock, see who holds what, clean up safely.

Built on argparse (no dependency) and on the library itself: `run` takes the lock with
`ProcessLock`, so waiting never polls and the lock file is vetted exactly as for Python callers.

Modules only one subcommand needs (subprocess, json, datetime, shlex) are imported where they
are used: `proclock path` starts ~5 ms sooner (bench/run.py, section 4).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
import time

from . import _dirs, _gc, _holder, _names, _semfiles
from ._errors import LockHeldError, LockNameError, LockTimeoutError, ProcLockError
from ._lock import ProcessLock
from ._policy import Retry
from ._semaphore import ProcessSemaphore, SemaphoreFullError, current_slot, turnstile_file_name

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any, NoReturn, TextIO

    from typing_extensions import Self

    from ._holder import Holder

PROG = "proclock"
EXIT_USAGE = 2
EXIT_CANTUSE = 73  # EX_CANTCREAT (sysexits.h): flock(1) uses it when it cannot create the file
EXIT_NOEXEC = 126  # as a shell: found but cannot be executed
EXIT_NOTFOUND = 127  # as a shell: command not found
EXIT_INTERRUPTED = 128 + signal.SIGINT
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

_DIGITS_RE = re.compile(r"[0-9]+")
_DURATION_RE = re.compile(r"(?P<n>\d+(?:\.\d*)?|\.\d+)(?P<unit>[smhdw]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}

EXIT_STATUS = f"""\
exit status:
  COMMAND's own     run: COMMAND ran; its exit status is proclock's
  128+N             run: COMMAND was killed by signal N (130: Ctrl-C while waiting)
  1, or -E N        run: the lock is busy (-n, -w expired, --retry spent)
  {EXIT_USAGE}                 bad usage: unknown option, missing '--' or COMMAND, bad value,
                    a flock(1) option proclock does not have (-u, -F, flock 9)
  {EXIT_CANTUSE}                the lock directory or file cannot be used (unsafe, EACCES, EROFS),
                    or (status, path, gc) the lock directory does not exist
  {EXIT_NOEXEC}               run: COMMAND was found but cannot be executed
  {EXIT_NOTFOUND}               run: COMMAND was not found
"""

MAIN_EPILOG = f"""\
examples:
  proclock run nightly-backup -- /usr/local/bin/backup.sh
  proclock run -n -E 0 nightly-sync -- /usr/local/bin/sync.sh    # cron: skip if running
  proclock status
  flock -n "$(proclock path nightly-backup)" ./backup.sh          # the same lock, via flock(1)
  proclock gc --older-than 7d

{EXIT_STATUS}"""

RUN_EPILOG = f"""\
examples:
  proclock run nightly-backup -- /usr/local/bin/backup.sh
  proclock run -n -E 0 nightly-sync -- /usr/local/bin/sync.sh    # busy: exit 0, quietly with -q
  proclock run -w 30 db-migrate -- ./migrate.sh --all             # wait at most 30 s
  proclock run -n --retry 5 --retry-delay 2 report -- ./report.sh # 5 attempts, 2 s apart
  proclock run -s cache-read -- ./read-cache.sh                   # shared (reader) lock
  proclock run --path /var/lock/app.lock -- ./app                 # a file flock(1) users share
  proclock run backup -c 'dump | gzip > /tmp/db.gz'               # as flock -c: $SHELL -c STRING

-n with -w is -n, as in flock(1): one try, whatever the order. flock(1)'s -u, -F and descriptor
form (flock 9) act on descriptors of the calling shell: proclock refuses them and says what to
use instead (flock itself, on "$(proclock path --mkdir NAME)").

By default COMMAND inherits the lock descriptor, as with flock(1): the lock lives as long as
COMMAND and whatever it forks keep it open. With -o only proclock holds it, and it is released
when COMMAND exits. SIGINT, SIGTERM and SIGHUP sent to proclock are forwarded to COMMAND.
While waiting on a terminal, a line shows who holds the lock, updated every second.
-v prints to stderr when the lock is acquired (and how long that took), the command started,
how COMMAND ended, and when the lock was released (or left to COMMAND's processes). -q
suppresses the busy line and the waiting line; errors are still printed.

{EXIT_STATUS}"""

STATUS_EPILOG = """\
examples:
  proclock status                       # every lock file in the lock directory
  proclock status nightly-backup        # just these locks
  proclock status --json | jq '.[] | select(.state != "free")'

Columns: NAME, STATE (free, held, shared), PID and COMMAND of the holder, SINCE (when it was
acquired, local time, where the lock file records it), WAITERS (processes blocked on it). A lock
file whose name cannot be recovered shows as its file name in angle brackets (JSON: "name":
null). --json times are ISO 8601 in UTC (2026-12-02T14:03:07.123+00:00).
status never creates the lock directory. A default directory that does not exist yet means no
lock was taken there: status shows none, and says so on stderr. A --dir or $PROCLOCK_DIR that
does not exist is an error (73).

exit status: 0; 2 bad usage; 73 the lock directory cannot be used, or --dir/$PROCLOCK_DIR is
missing.
"""

PATH_EPILOG = """\
examples:
  proclock path nightly-backup
  flock -n "$(proclock path --mkdir nightly-backup)" ./backup.sh   # flock(1), the same lock
  proclock path --dir /srv/locks nightly-backup

path never creates the lock directory unless --mkdir is given (flock(1) creates the lock file,
but not its directory): a missing directory is reported, and nothing is printed on stdout.

exit status: 0; 2 bad usage (e.g. an empty name); 73 the lock directory cannot be used or does
not exist (add --mkdir).
"""

GC_EPILOG = """\
examples:
  proclock gc                        # delete every lock file nobody holds right now
  proclock gc --older-than 7d        # ... and that was last written over a week ago
  proclock gc --dry-run --older-than 12h

Only files proclock names (<prefix>-<32 hex digits>.lock) are considered. Each is deleted only
if gc can lock it with LOCK_EX|LOCK_NB at that moment, and it is unlinked while gc holds the
lock: a process that opened the old file before then notices (proclock checks the inode after
every acquisition; flock(1) does not) and takes the new file. Held files are never touched.
DURATION is a number with an optional unit: s, m, h, d, w (30s, 10m, 2h, 7d); plain is seconds.
gc never creates the lock directory: a default one that does not exist has nothing to delete
(exit 0); a --dir or $PROCLOCK_DIR that does not exist is an error (73).

exit status: 0; 1 a file could not be deleted; 2 bad usage; 73 the directory cannot be used, or
--dir/$PROCLOCK_DIR is missing.
"""


class _Version(argparse.Action):
    """--version, looked up only when asked for (importlib.metadata costs ~20 ms per start)."""

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        import proclock  # noqa: PLC0415

        sys.stdout.write(f"{PROG} {proclock.__version__}\n")
        parser.exit()


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (then exit 2), never a traceback."""

    def error(self, message: str) -> NoReturn:
        self.refuse(f"{message} (see '{self.prog} --help')")

    def refuse(self, message: str) -> NoReturn:
        """A usage error whose message already says what to do instead."""
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(EXIT_USAGE)


class _Unsupported(argparse.Action):
    """A flock(1) option proclock does not have: noted here, refused after parsing (_refusal).

    Refused after parsing rather than here so that the message can name the lock.
    """

    def __init__(self, option_strings: Sequence[str], dest: str, nargs: int = 0) -> None:
        del dest
        super().__init__(
            option_strings, "unsupported", nargs=nargs, default=None, help=argparse.SUPPRESS
        )

    def __call__(
        self,
        parser: argparse.ArgumentParser,  # noqa: ARG002  (argparse's signature)
        namespace: argparse.Namespace,
        values: object,  # noqa: ARG002
        option_string: str | None = None,
    ) -> None:
        if namespace.unsupported is None:
            namespace.unsupported = option_string or self.option_strings[0]


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        msg = f"not a number of seconds: {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if not value >= 0 or value == float("inf"):
        msg = f"must be a finite number of seconds >= 0, not {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        msg = f"invalid limit {text!r}: give a whole number of slots, such as 2"
        raise argparse.ArgumentTypeError(msg) from None
    if value < 1:
        msg = f"invalid limit {text!r}: a semaphore has at least 1 slot"
        raise argparse.ArgumentTypeError(msg)
    return value


def _exit_code(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 255:  # noqa: PLR2004  (an exit status is one byte)
        msg = f"an exit status is an integer from 0 to 255, not {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _attempts(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        msg = f"the number of attempts is an integer >= 1, not {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def parse_duration(text: str) -> float:
    """`30s`, `10m`, `2h`, `7d`, `1w` or plain seconds, as seconds."""
    match = _DURATION_RE.fullmatch(text.strip())
    if match is None:
        msg = f"not a duration: {text!r} (examples: 30s, 10m, 2h, 7d)"
        raise argparse.ArgumentTypeError(msg)
    return float(match["n"]) * _UNITS[match["unit"]]


def _add_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dir",
        metavar="DIR",
        help="the lock directory (default: $PROCLOCK_DIR, $XDG_RUNTIME_DIR/proclock, "
        "<tmp>/proclock-<uid>)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The parser of the whole command line."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog=PROG,
        description="Named process locks on flock(2): run a command holding one, see who "
        "holds what, clean up.",
        epilog=MAIN_EPILOG,
        formatter_class=fmt,
    )
    parser.add_argument(
        "-V", "--version", action=_Version, nargs=0, help="print the version and exit"
    )
    sub = parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)

    run = sub.add_parser(
        "run",
        help="run COMMAND holding lock NAME",
        usage=f"{PROG} run NAME [options] -- COMMAND [ARGS...]\n"
        f"       {PROG} run NAME [options] -c STRING\n"
        f"       {PROG} run --path FILE [options] (-- COMMAND [ARGS...] | -c STRING)",
        description="Run COMMAND holding lock NAME (flock(1)-compatible options).",
        epilog=RUN_EPILOG,
        formatter_class=fmt,
    )
    run.add_argument("name", metavar="NAME", nargs="?", help="the lock's name")
    run.add_argument(
        "-l",
        "--limit",
        metavar="N",
        type=_limit,
        help="a semaphore: run COMMAND in one of N slots (at most N at once); "
        "PROCLOCK_SLOT=<0..N-1> is exported to it",
    )
    run.add_argument(
        "-c",
        "--command",
        metavar="STRING",
        dest="shell_command",
        help="run STRING with $SHELL -c (/bin/sh if unset), as flock -c does; instead of "
        "-- COMMAND",
    )
    mode = run.add_mutually_exclusive_group()
    mode.add_argument("-s", "--shared", action="store_true", help="take a shared (reader) lock")
    mode.add_argument(
        "-x", "-e", "--exclusive", action="store_true", help="take an exclusive lock (the default)"
    )
    run.add_argument(
        "-n",
        "--nonblock",
        "--nonblocking",
        "--nb",
        action="store_true",
        help="fail at once if the lock is busy (with -w too, as in flock(1))",
    )
    run.add_argument(
        "-w", "--timeout", "--wait", metavar="SECONDS", type=_seconds, help="wait at most SECONDS"
    )
    run.add_argument(
        "-E",
        "--conflict-exit-code",
        metavar="N",
        type=_exit_code,
        default=1,
        help="exit status when the lock is busy or the wait timed out (default 1)",
    )
    run.add_argument(
        "-o",
        "--close",
        action="store_true",
        help="don't let COMMAND inherit the lock: it is released when COMMAND exits",
    )
    run.add_argument(
        "--retry",
        metavar="N",
        type=_attempts,
        help="make N attempts in all (each one -n try or one -w wait; needs -n or -w)",
    )
    run.add_argument(
        "--retry-delay",
        metavar="SECONDS",
        type=_seconds,
        help="pause before the second attempt (default 0.1; doubles each time, capped at 10)",
    )
    _add_dir(run)
    run.add_argument(
        "--path", metavar="FILE", help="an explicit lock file (shared with flock(1) users)"
    )
    talk = run.add_mutually_exclusive_group()
    talk.add_argument("-q", "--quiet", action="store_true", help="no busy line, no waiting line")
    talk.add_argument(
        "-v", "--verbose", action="store_true", help="report acquisition, command and release"
    )
    # flock(1) options proclock refuses with a reason (_refusal), not "unrecognized arguments".
    run.add_argument("-u", "--unlock", action=_Unsupported)
    run.add_argument("-F", "--no-fork", action=_Unsupported)
    run.add_argument("--fcntl", action=_Unsupported)
    run.add_argument("--start", "--length", action=_Unsupported, nargs=1)

    status = sub.add_parser(
        "status",
        help="every lock in the directory: free, or held by whom",
        description="Show every lock file in the lock directory (or the named locks): free, "
        "or held by whom, since when, and how many wait.",
        epilog=STATUS_EPILOG,
        formatter_class=fmt,
    )
    status.add_argument("names", metavar="NAME", nargs="*", help="show only these locks")
    status.add_argument("--json", action="store_true", help="a JSON list of objects")
    _add_dir(status)

    path = sub.add_parser(
        "path",
        help="print the lock file's path (for flock(1), scripts)",
        description="Print the file of lock NAME: the directory is vetted, and created only "
        "with --mkdir; the file never is.",
        epilog=PATH_EPILOG,
        formatter_class=fmt,
    )
    path.add_argument("name", metavar="NAME", help="the lock's name")
    path.add_argument(
        "--mkdir",
        action="store_true",
        help="create the lock directory if missing (0700), as proclock run would: for flock(1)",
    )
    _add_dir(path)

    gc = sub.add_parser(
        "gc",
        help="delete lock files nobody holds, without the race",
        description="Delete the lock files nobody holds, safely against concurrent acquirers.",
        epilog=GC_EPILOG,
        formatter_class=fmt,
    )
    gc.add_argument(
        "--older-than",
        metavar="DURATION",
        type=parse_duration,
        help="only files last modified at least DURATION ago (30s, 10m, 2h, 7d)",
    )
    gc.add_argument("--dry-run", action="store_true", help="list what would go, delete nothing")
    _add_dir(gc)
    return parser


# -- helpers -------------------------------------------------------------------------------------


def _say(message: str) -> None:
    sys.stderr.write(f"{PROG}: {message}\n")
    sys.stderr.flush()


def _when(at: float | None) -> str | None:
    """Local time, for people (the table, the busy line)."""
    if at is None:
        return None
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def _iso(at: float | None) -> str | None:
    """ISO 8601 in UTC with its offset, for programs: as strings, they sort as the times do."""
    if at is None:
        return None
    import datetime as dt  # noqa: PLC0415

    return dt.datetime.fromtimestamp(at, dt.timezone.utc).isoformat(timespec="milliseconds")


def _ago(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 60:  # noqa: PLR2004
        return f"{s}s"
    if s < 3600:  # noqa: PLR2004
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:  # noqa: PLR2004
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _who(holder: Holder | None) -> str:
    return "another process" if holder is None else holder.describe()


def _busy_line(error: LockHeldError, label: str) -> str:
    if isinstance(error, SemaphoreFullError):
        return str(error)
    holder = error.holder
    at = holder.acquired_at if holder is not None else None
    since = (
        "since an unknown time"
        if at is None
        else f"since {_when(at)} ({_ago(time.time() - at)} ago)"
    )
    line = f"lock {label!r} ({error.path}) is held by {_who(holder)} {since}"
    if isinstance(error, LockTimeoutError):
        line += f"; gave up after {error.waited:.1f}s"
    return line


def _status_of(signal_or_code: int) -> int:
    return 128 - signal_or_code if signal_or_code < 0 else signal_or_code


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


# -- run -----------------------------------------------------------------------------------------


class _WaitLine:
    """On a terminal, what apt shows while dpkg is locked: who holds it, updated every second.

    The wait itself is the library's blocking acquire in the main thread; this daemon thread
    only reads who holds the lock (/proc/locks and the file's record) once a second and
    rewrites the line in place, until the acquire returns.
    """

    def __init__(self, stream: TextIO, label: str, path: str) -> None:
        self._stream, self._label, self._path = stream, label, path
        self._done = threading.Event()
        self._start = time.monotonic()
        self._shown = False
        self._thread = threading.Thread(target=self._run, name="proclock-wait-line", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _text(self, holder: Holder | None, width: int) -> str:
        elapsed = f", {int(time.monotonic() - self._start)}s..."
        head = f"waiting for lock {self._label!r}"
        if holder is None:
            return (head + elapsed)[: width - 1]
        who = holder.describe()  # as errors and status name a holder
        room = max(width - 1 - len(head) - len(" held by ") - len(elapsed), 11)
        if len(who) > room:
            who = who[: room - 3] + "..."
        return f"{head} held by {who}{elapsed}"

    def _run(self) -> None:
        me = os.getpid()
        first = True
        while True:
            try:
                holder = _holder.holder_of(self._path)
            except OSError:
                holder = None
            # The first look, before any wait could have begun, shows only a real holder:
            # an uncontended acquisition flashes nothing.
            if not (holder is not None and holder.pid == me) and not (first and holder is None):
                try:
                    width = os.get_terminal_size(self._stream.fileno()).columns
                except (OSError, ValueError):
                    width = 0
                text = self._text(holder, width if width > 20 else 80)  # noqa: PLR2004
                if not self._done.is_set():
                    self._stream.write(f"\r{text}\x1b[K")
                    self._stream.flush()
                    self._shown = True
            first = False
            if self._done.wait(1.0):
                break
        if self._shown:
            self._stream.write("\r\x1b[K")
            self._stream.flush()


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _make_lock(args: argparse.Namespace, parser: argparse.ArgumentParser) -> ProcessLock:
    if args.name is None and args.path is None:
        parser.error("give a lock NAME (or --path FILE)")
    if args.name is not None and args.path is not None:
        parser.error("give a lock NAME or --path FILE, not both")
    if args.path is not None and args.dir is not None:
        parser.error("--path names the file: --dir cannot apply to it")
    if args.retry_delay is not None and args.retry is None:
        parser.error("--retry-delay needs --retry N")
    if args.retry is not None and not (args.nonblock or args.timeout is not None):
        parser.error("--retry needs a bounded attempt: add -n or -w SECONDS")
    if args.limit is not None and (args.path is not None or args.shared):
        parser.error("--limit makes a semaphore of NAME: it takes neither --path nor --shared")
    retry: Retry | None = None
    if args.retry is not None:
        retry = (
            Retry(args.retry) if args.retry_delay is None else Retry(args.retry, args.retry_delay)
        )
    try:
        if args.limit is not None:
            return ProcessSemaphore(
                args.name,
                limit=args.limit,
                blocking=not args.nonblock,
                timeout=args.timeout,
                retry=retry,
                lock_dir=args.dir,
            )
        return ProcessLock(
            args.name,
            path=args.path,
            blocking=not args.nonblock,
            # -n with -w: flock(1) makes one LOCK_NB try, the timer never matters; so do we.
            timeout=None if args.nonblock else args.timeout,
            retry=retry,
            shared=args.shared,
            lock_dir=args.dir,
        )
    except ValueError as exc:  # LockNameError included: an empty name, a NUL byte
        parser.error(str(exc))


def _run(args: argparse.Namespace, command: list[str], parser: argparse.ArgumentParser) -> int:
    lock = _make_lock(args, parser)
    label = lock.name
    try:
        path = lock.path  # vets (or creates) the directory now: a bad one fails before waiting
        start = time.monotonic()
        one_try = (args.nonblock or args.timeout == 0) and args.retry is None
        if not one_try and not args.quiet and _is_tty(sys.stderr):
            with _WaitLine(sys.stderr, label, path):
                lock.acquire()
        else:
            lock.acquire()
    except LockHeldError as exc:
        if not args.quiet:
            _say(_busy_line(exc, label))
        return int(args.conflict_exit_code)
    except KeyboardInterrupt:
        if not args.quiet:
            _say(f"interrupted while waiting for lock {label!r}")
        return EXIT_INTERRUPTED
    except (OSError, ProcLockError) as exc:
        _say(f"cannot use lock {label!r}: {exc}")
        return EXIT_CANTUSE
    except ValueError as exc:  # a semaphore's limit other than the one its users recorded
        _say(f"cannot use {label!r}: {exc}")
        return EXIT_USAGE
    acquired = time.monotonic()
    kind = "shared" if args.shared else "exclusive"
    if isinstance(lock, ProcessSemaphore):  # COMMAND learns its slot; the slot's lock is passed
        slot = current_slot(lock.name)
        os.environ["PROCLOCK_SLOT"] = str(slot)
        kind = f"slot {slot} of the semaphore, limit {lock.limit}:"
    if args.verbose:
        _say(f"acquired {kind} lock {label!r} ({path}) after {acquired - start:.3f}s")
    fd = lock._held_fd()  # noqa: SLF001
    assert fd is not None  # noqa: S101  (just acquired)
    status = _spawn_and_wait(command, () if args.close else (fd,), verbose=args.verbose)
    if args.close:
        lock.release()
        if args.verbose:
            _say(f"released lock {label!r} after holding {time.monotonic() - acquired:.3f}s")
    elif args.verbose:
        # No LOCK_UN: the open file description is shared with COMMAND's processes, and
        # unlocking it would take the lock from any of them still running (flock(1) semantics).
        _say(
            f"closing lock {label!r} after {time.monotonic() - acquired:.3f}s; it stays held "
            "while a process COMMAND started keeps the descriptor open"
        )
    return status


def _spawn_and_wait(command: list[str], pass_fds: tuple[int, ...], *, verbose: bool) -> int:
    """Run COMMAND, forwarding SIGINT, SIGTERM and SIGHUP to it; its status, as a shell gives."""
    import subprocess  # noqa: PLC0415

    child: subprocess.Popen[bytes] | None = None
    pidfd: int | None = None
    pending: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        if child is None:
            pending.append(signum)
            return
        if child.returncode is not None:
            return
        try:
            if pidfd is not None:  # immune to pid reuse once the child is reaped
                signal.pidfd_send_signal(pidfd, signum)
            else:
                os.kill(child.pid, signum)
        except ProcessLookupError:
            pass

    # A signal proclock was started ignoring (nohup, `&` in a script) stays ignored, and
    # COMMAND inherits that as it would without proclock.
    previous = {
        sig: signal.signal(sig, forward)
        for sig in FORWARDED
        if signal.getsignal(sig) is not signal.SIG_IGN
    }
    try:
        try:
            child = subprocess.Popen(command, pass_fds=pass_fds)  # noqa: S603
        except FileNotFoundError:
            _say(f"{command[0]}: command not found")
            return EXIT_NOTFOUND
        except PermissionError:
            _say(f"{command[0]}: permission denied")
            return EXIT_NOEXEC
        except OSError as exc:
            _say(f"{command[0]}: cannot execute: {exc.strerror}")
            return EXIT_NOEXEC
        started = time.monotonic()
        if verbose:
            how = "inherits the lock" if pass_fds else "does not inherit the lock"
            _say(f"running {subprocess.list2cmdline(command)} (pid {child.pid}, {how})")
        if hasattr(os, "pidfd_open"):
            try:
                pidfd = os.pidfd_open(child.pid)
            except OSError:
                pidfd = None
        for signum in pending:
            forward(signum, None)
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if pidfd is not None:
            os.close(pidfd)
    if verbose:
        took = time.monotonic() - started
        if code < 0:
            _say(f"COMMAND was killed by {_signal_name(-code)} after {took:.3f}s")
        else:
            _say(f"COMMAND exited with status {code} after {took:.3f}s")
    return _status_of(code)


# -- status ------------------------------------------------------------------------------------


def _describe_file(path: str, name: str | None) -> tuple[dict[str, Any], Holder | None]:
    """One lock file as `status --json` shows it (keys documented in docs/cli.md), its holder."""
    holder, waiters = _holder.lock_state(path)
    if name is None:
        meta = _holder.read_metadata(path)
        name = _names.recover_name(os.path.basename(path), meta.get("name") if meta else None)
    state = "free" if holder is None else "shared" if holder.shared else "held"
    row = {
        "name": name,
        "file": os.path.basename(path),
        "path": path,
        "exists": os.path.lexists(path),
        "state": state,
        "pid": holder.pid if holder is not None else None,
        "own_pid": holder.own_pid if holder is not None else None,
        "elsewhere": holder.elsewhere if holder is not None else None,
        "hostname": holder.hostname if holder is not None else None,
        "argv": list(holder.argv) if holder is not None and holder.argv else None,
        "command": holder.command if holder is not None else None,
        "acquired_at": _iso(holder.acquired_at) if holder is not None else None,
        "waiters": waiters,
    }
    return row, holder


class _Directory:
    """The lock directory of status, path and gc: resolved and vetted, never created."""

    def __init__(self, lock_dir: str | None) -> None:
        self.path, self.kind = _dirs.resolve(lock_dir)
        if lock_dir is not None:
            self.origin = "--dir"
        elif self.kind == _dirs.NAMED:
            self.origin = "$PROCLOCK_DIR"
        else:
            self.origin = "the default"
        try:
            _dirs.vet(self.path, self.kind, create=False)
        except FileNotFoundError:
            self.exists = False
        else:
            self.exists = True

    def file_of(self, name: str) -> str:
        """The lock file of `name`, as ProcessLock(name).path names it (FlockBackend.locate)."""
        return os.path.join(os.path.realpath(self.path), _names.file_name(name))

    def missing(self, remedy: str) -> int:
        _say(f"the lock directory {self.path} ({self.origin}) does not exist; {remedy}")
        return EXIT_CANTUSE


_NAMED_MISSING = "check the spelling (proclock run creates it when it first takes a lock there)"


def _named_rows(name: str, where: _Directory) -> list[tuple[dict[str, Any], Holder | None]]:
    """The rows of `status NAME`: the lock's, or a semaphore's of that name (and its slots)."""
    turnstile = os.path.join(os.path.realpath(where.path), turnstile_file_name(name))
    sem = _semfiles.at(turnstile) if where.exists else None
    if sem is not None and sem.name == name:
        return _semfiles.status_rows(sem, _describe_file)
    return [_describe_file(where.file_of(name), name)]


def _status(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        names = [_names.check_name(n) for n in args.names]
    except LockNameError as exc:
        parser.error(str(exc))
    try:
        where = _Directory(args.dir)
        if not where.exists and where.kind == _dirs.NAMED:
            return where.missing(_NAMED_MISSING)
        if not where.exists:
            # Not an error: no lock was taken here yet. Said on stderr all the same, because
            # "no locks" may come from looking in the wrong place (cron has no XDG_RUNTIME_DIR).
            _say(
                f"the lock directory {where.path} ({where.origin}) does not exist yet: no lock "
                "was taken there (a job run with another environment, e.g. from cron, may use "
                "another; set PROCLOCK_DIR to share one)"
            )
        if names:
            rows = [row for n in names for row in _named_rows(n, where)]
        elif where.exists:
            semaphores, files = _semfiles.find(_gc.lock_files(where.path))
            rows = [row for sem in semaphores for row in _semfiles.status_rows(sem, _describe_file)]
            rows += [_describe_file(p, None) for p in files]
        else:
            rows = []
    except OSError as exc:
        _say(f"cannot use the lock directory: {exc}")
        return EXIT_CANTUSE
    if args.json:
        import json  # noqa: PLC0415

        sys.stdout.write(json.dumps([row for row, _ in rows], indent=2) + "\n")
        return 0
    header = ("NAME", "STATE", "PID", "SINCE", "WAITERS", "COMMAND")
    table = [
        header,
        *(
            (
                row["name"] if row["name"] is not None else f"<{row['file']}>",
                row["state"],
                "-" if row["pid"] is None else str(row["pid"]),
                (_when(holder.acquired_at) if holder is not None else None) or "-",
                str(row["waiters"]),
                # One line whatever the argv holds: control characters escaped, as everywhere.
                holder.short_command() if holder is not None and holder.argv else "-",
            )
            for row, holder in rows
        ),
    ]
    # COMMAND last: it is the one long column, and the others stay aligned.
    widths = [max(len(r[i]) for r in table) for i in range(len(header) - 1)]
    for r in table:
        cells = [c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)]
        sys.stdout.write("  ".join([*cells, r[-1]]).rstrip() + "\n")
    return 0


# -- path, gc ------------------------------------------------------------------------------------


def _path(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        name = _names.check_name(args.name)
    except LockNameError as exc:
        parser.error(str(exc))
    try:
        where = _Directory(args.dir)
        if not where.exists and args.mkdir:
            _dirs.vet(where.path, where.kind)  # as `proclock run` creates it: 0700
        elif not where.exists:
            # flock(1) creates the lock file but not its directory: say so before it fails.
            return where.missing("add --mkdir to create it (0700), as proclock run would")
        sys.stdout.write(f"{where.file_of(name)}\n")
    except OSError as exc:
        _say(f"cannot use the lock directory: {exc}")
        return EXIT_CANTUSE
    return 0


def _collect(args: argparse.Namespace) -> int:
    try:
        where = _Directory(args.dir)
        if not where.exists:
            if where.kind == _dirs.NAMED:
                return where.missing(_NAMED_MISSING)
            return 0  # the default directory, not made yet: no lock file to delete
        files = _gc.collectable(where.path)
        semaphores, files = _semfiles.find(files)
    except OSError as exc:
        _say(f"cannot use the lock directory: {exc}")
        return EXIT_CANTUSE
    failed = False
    for sem in semaphores:  # a semaphore's files go together, or not at all
        try:
            removed = _semfiles.collect(sem, older_than=args.older_than, dry_run=args.dry_run)
        except OSError as exc:
            _say(f"cannot delete the files of semaphore {sem.name!r}: {exc}")
            failed = True
            continue
        for path in removed:
            sys.stdout.write(f"{'would remove' if args.dry_run else 'removed'} {path}\n")
    for path in files:
        try:
            gone = _gc.collect(path, older_than=args.older_than, dry_run=args.dry_run)
        except OSError as exc:
            _say(f"cannot delete {path}: {exc}")
            failed = True
            continue
        if gone:
            sys.stdout.write(f"{'would remove' if args.dry_run else 'removed'} {path}\n")
    return 1 if failed else 0


# -- main ----------------------------------------------------------------------------------------


def _split_command(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """For `run`: (options before '--', COMMAND after it), or COMMAND None if '--' is missing."""
    if argv and argv[0] == "run" and "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, None


def _quote(word: str) -> str:
    import shlex  # noqa: PLC0415

    return shlex.quote(word)


def _refusal(option: str, name: str | None) -> str:
    """Why proclock does not have flock(1)'s `option`, and what to use instead."""
    if name is None or _DIGITS_RE.fullmatch(name):  # `-u 9`: a descriptor, not a lock name
        name = "NAME"
    where = f'"$(proclock path --mkdir {_quote(name)})"'
    if option in {"-u", "--unlock"}:
        return (
            f"{option} is not supported: it unlocks a descriptor the calling shell opened, "
            f"which proclock cannot reach; use flock itself: exec 9>>{where}; flock 9; ...; "
            "flock -u 9"
        )
    if option in {"-F", "--no-fork"}:
        return (
            f"{option} is not supported: proclock stays COMMAND's parent to forward signals and "
            "report how it ended, and COMMAND inherits the lock, so it lasts as long as with "
            f"-F: drop {option} (or use flock -F {where} COMMAND)"
        )
    return (  # --fcntl, --start, --length
        f"{option} is not supported: proclock takes whole-file flock(2) locks, not fcntl(2) "
        f"byte ranges; use flock {option} on {where}"
    )


def _run_command(
    args: argparse.Namespace,
    extra: list[str],
    command: list[str] | None,
    parser: _Parser,
) -> list[str]:
    """COMMAND for `run`: after '--', or -c STRING through the shell; usage errors exit here."""
    options = [a for a in extra if a.startswith("-") and a != "-"]
    if options:
        parser.error(f"unrecognized arguments: {' '.join(options)}")
    if args.unsupported is not None:
        parser.refuse(_refusal(args.unsupported, args.name))
    if args.shell_command is not None:
        if command is not None:
            parser.error("give -c STRING or '--' COMMAND, not both")
        if extra:
            parser.error(
                f"-c takes exactly one STRING: quote the whole command line, as in "
                f"-c 'backup.sh --full' (found {' '.join(extra)!r} after it)"
            )
        # flock(1): $SHELL, or _PATH_BSHELL when it is unset or empty.
        return [os.environ.get("SHELL") or "/bin/sh", "-c", args.shell_command]
    if command is None:
        name = args.name
        if not extra and args.path is None and name is not None and _DIGITS_RE.fullmatch(name):
            parser.refuse(
                f"'run {name}' with no COMMAND is flock's descriptor form (flock {name}), which "
                "locks a descriptor of the calling shell that proclock cannot reach; use flock "
                f'itself: exec {name}>>"$(proclock path --mkdir NAME)"; flock {name} (a lock '
                f"named {name!r} needs a COMMAND: run {name} -- COMMAND)"
            )
        hint = f" (found {' '.join(extra)!r})" if extra else ""
        parser.error(
            f"missing '--' before COMMAND{hint}: run NAME [options] -- COMMAND, "
            "or run NAME [options] -c 'STRING'"
        )
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not command:
        parser.error("missing COMMAND after '--'")
    return command


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `proclock` command line; returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    before, command = _split_command(args_list)
    args, extra = parser.parse_known_args(before)
    sub = _subparser(parser, args.subcommand)
    if args.subcommand == "run":
        command = _run_command(args, extra, command, sub)
    elif extra:
        sub.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.subcommand == "run":
            assert command is not None  # noqa: S101  (_run_command returns one or exits)
            return _run(args, command, sub)
        if args.subcommand == "status":
            return _status(args, sub)
        if args.subcommand == "path":
            return _path(args, sub)
        return _collect(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `proclock status | head`
        # Python would complain again when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def _subparser(parser: argparse.ArgumentParser, name: str) -> _Parser:
    for action in parser._actions:  # noqa: SLF001  (argparse keeps subparsers only there)
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            return action.choices[name]  # type: ignore[no-any-return]
    raise AssertionError(name)  # pragma: no cover
