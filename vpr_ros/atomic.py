"""Atomic file and directory writes: a reader never sees a half-written output.

Files are written to a temporary sibling and renamed over the target
(``os.replace`` is atomic on POSIX within one file system).

Directories (maps, training runs, bags) are built in a temporary sibling
``.NAME.tmp-PID-*`` and swapped in at the end:

* Where the kernel and file system offer it (Linux >= 3.15: ext4, xfs, btrfs, tmpfs, ...),
  the swap is one ``renameat2(RENAME_EXCHANGE)`` call: NAME is the old or the new
  directory at every instant, also after a kill.
* Elsewhere two renames are used (NAME -> ``.NAME.old-PID``, temporary -> NAME).  A kill
  between them leaves no NAME for a moment; the next writer, and any reader that finds NAME
  missing (:func:`recover`), renames ``.NAME.old-PID`` of a dead process back.

Writers of one target exclude each other with an ``fcntl.flock`` on ``.NAME.lock`` beside
it (:func:`write_lock`); a second writer fails at once with "... is being written by PID N"
or waits up to ``wait_s`` seconds.  Readers take no lock.  Leftover ``.NAME.tmp-PID-*`` and
``.NAME.old-PID`` folders of dead processes (SIGKILL skips every cleanup) are removed by
the next writer; those of a live process never are.

OS errors while writing (disk full, read-only file system, no permission) are raised as
:class:`~vpr_ros.errors.OutputError` naming the path.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, Optional, Union

from .errors import LockedError, OutputError

PathLike = Union[str, os.PathLike]

log = logging.getLogger(__name__)


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp/mkdtemp create private (0600/0700) entries; outputs get the usual permissions.
_UMASK = _current_umask()
FILE_MODE = 0o666 & ~_UMASK
DIR_MODE = 0o777 & ~_UMASK

# errno -> what to do about it
_WRITE_FIXES = {
    errno.ENOSPC: "the disk is full; free space or write somewhere else",
    errno.EDQUOT: "the disk quota is exceeded; free space or write somewhere else",
    errno.EFBIG: "the file is too large for this file system; write somewhere else",
    errno.EROFS: "the file system is read-only; write somewhere else",
    errno.EACCES: "no permission; choose a folder you can write, or fix its permissions",
    errno.EPERM: "no permission; choose a folder you can write, or fix its permissions",
}
# These can only mean "the output cannot be written", wherever in a write block they occur.
_ALWAYS_OUTPUT = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


def output_error(exc: OSError, path: PathLike) -> OutputError:
    """One line for an OS error writing ``path``: what failed and what to do."""
    fix = _WRITE_FIXES.get(exc.errno, "")
    reason = exc.strerror or str(exc)
    return OutputError(f"cannot write {path}: {reason}" + (f"; {fix}" if fix else ""))


def is_output_os_error(exc: BaseException, inside: Optional[Path] = None) -> bool:
    """An OSError that means the output cannot be written (not a bad input file):
    disk full / read-only anywhere, or no permission on a path inside ``inside``."""
    if not isinstance(exc, OSError) or exc.errno not in _WRITE_FIXES:
        return False
    if exc.errno in _ALWAYS_OUTPUT:
        return True
    return (inside is not None and exc.filename is not None
            and str(exc.filename).startswith(str(inside)))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(target: PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it to ``target`` on success.

    ``suffix`` keeps a file extension for writers that insist on one (``np.save``).
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp" + suffix,
                                        dir=target.parent)
        os.close(fd)
    except OSError as exc:
        if exc.errno in _WRITE_FIXES:
            raise output_error(exc, target) from None
        raise
    tmp = Path(tmp_name)
    try:
        os.chmod(tmp, FILE_MODE)
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if is_output_os_error(exc, tmp):
            raise output_error(exc, target) from None
        raise


def check_writable(target: PathLike) -> None:
    """Fail early (OutputError naming ``target``) when ``target``'s folder cannot be
    written: creates and removes an empty file there.  Call before long work."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".probe",
                                    dir=target.parent)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        if exc.errno in _WRITE_FIXES:
            raise output_error(exc, target) from None
        raise


def atomic_write_bytes(target: PathLike, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: PathLike, text: str) -> None:
    atomic_write_bytes(target, text.encode("utf-8"))


def atomic_write_json(target: PathLike, obj, indent: int = 2) -> None:
    atomic_write_text(target, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


# --------------------------------------------------------------------------- rename exchange

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2 = None
_exchange_supported: Optional[bool] = None   # None: not tried yet


def _load_renameat2():
    global _renameat2, _exchange_supported
    if _renameat2 is None and _exchange_supported is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            fn = libc.renameat2                       # glibc >= 2.28
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                           ctypes.c_uint]
            fn.restype = ctypes.c_int
            _renameat2 = fn
        except (OSError, AttributeError):
            _exchange_supported = False
    return _renameat2


def exchange(a: PathLike, b: PathLike) -> bool:
    """Swap two existing paths atomically (``renameat2(RENAME_EXCHANGE)``).

    Returns False where the C library, kernel or file system does not offer it (ENOSYS,
    EINVAL, EOPNOTSUPP): the caller then falls back to two renames.  Other failures raise
    OSError.
    """
    fn = _load_renameat2()
    if fn is None or _exchange_supported is False:
        return False
    rc = fn(_AT_FDCWD, os.fsencode(str(a)), _AT_FDCWD, os.fsencode(str(b)), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False          # not offered here; another file system may (do not cache)
    raise OSError(err, os.strerror(err), str(a), None, str(b))


# --------------------------------------------------------------------------- leftovers

def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # exists, owned by another user
        return True
    return True


def _leftover_pid(name: str, prefix: str) -> Optional[int]:
    """PID in ``.NAME.tmp-PID-xxxx`` / ``.NAME.old-PID``; None when it has none (legacy)."""
    rest = name[len(prefix):]
    head = rest.split("-", 1)[0]
    return int(head) if head.isdigit() else None


def _leftovers(target: Path, kind: str):
    """(path, pid or None) of ``.NAME.<kind>-*`` folders beside ``target``."""
    prefix = f".{target.name}.{kind}-"
    with contextlib.suppress(OSError):
        for p in target.parent.iterdir():
            if p.name.startswith(prefix):
                yield p, _leftover_pid(p.name, prefix)


def recover(target: PathLike, wait_s: float = 2.0) -> bool:
    """Bring back a directory that a killed two-rename swap left missing.

    When ``target`` does not exist but ``.NAME.old-PID`` does: if PID is dead, rename it
    back (the interrupted write did not finish, so the old contents are the current
    ones); if PID is alive it is between its two renames, so wait up to ``wait_s`` for
    ``target`` to appear.  Readers call this before they report a missing map; it never
    blocks on a lock.  Returns True when ``target`` exists afterwards.
    """
    target = Path(target).absolute()
    deadline = time.monotonic() + wait_s
    while True:
        if target.exists():
            return True
        olds = list(_leftovers(target, "old"))
        if not olds:
            return False
        dead = [p for p, pid in olds if pid is None or not _pid_alive(pid)]
        for p in dead:
            try:
                os.rename(p, target)
                log.warning("restored %s from %s (a write was interrupted between its two "
                            "renames)", target, p.name)
                return True
            except FileNotFoundError:
                continue          # another process restored it first
            except OSError:
                break
        if time.monotonic() >= deadline:
            return target.exists()
        time.sleep(0.02)


def clean_leftovers(target: PathLike) -> None:
    """Remove ``.NAME.tmp-*`` and ``.NAME.old-*`` of dead processes (call under the lock)."""
    target = Path(target).absolute()
    recover(target, wait_s=0.0)
    for kind in ("tmp", "old"):
        for p, pid in _leftovers(target, kind):
            if pid is not None and _pid_alive(pid):
                continue
            shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------- writer lock

_held: Dict[str, int] = {}
_held_guard = threading.Lock()


def lock_path(target: PathLike) -> Path:
    target = Path(target).absolute()
    return target.parent / f".{target.name}.lock"


def _lock_holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        return "?"
    return text if text.isdigit() else "?"


@contextlib.contextmanager
def write_lock(target: PathLike, wait_s: float = 0.0, what: str = "") -> Iterator[None]:
    """Exclusive writer lock of ``target`` (``fcntl.flock`` on ``.NAME.lock`` beside it).

    A second writer raises LockedError ("... is being written by PID N") at once
    (``wait_s=0``) or after waiting ``wait_s`` seconds, logging one line while it waits.
    Re-entrant within a process.  The lock file is removed on release.
    """
    import fcntl

    target = Path(target).absolute()
    key = str(target)
    with _held_guard:
        if key in _held:
            _held[key] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            with _held_guard:
                _held[key] -= 1
        return
    path = lock_path(target)
    label = what or str(target)
    deadline = time.monotonic() + max(0.0, float(wait_s))
    told = False
    while True:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        except OSError as exc:
            if exc.errno in _WRITE_FIXES:
                raise output_error(exc, target) from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = _lock_holder(path)
            if time.monotonic() >= deadline:
                hint = ("wait for it to finish or pass --wait-lock SECONDS" if not wait_s
                        else f"waited {wait_s:g} s; try again later")
                raise LockedError(f"{label} is being written by PID {holder}; {hint} "
                                  f"(lock file {path})") from None
            if not told:
                log.warning("%s is being written by PID %s; waiting up to %g s", label,
                            holder, wait_s)
                told = True
            time.sleep(0.05)
            continue
        # The previous holder may have removed the file between our open and flock.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        break
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        with _held_guard:
            _held[key] = 1
        yield
    finally:
        with _held_guard:
            _held.pop(key, None)
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)          # closing releases the flock


# --------------------------------------------------------------------------- directories

def _swap_in(tmp: Path, target: Path) -> Optional[Path]:
    """Make ``tmp`` the new ``target``; returns the folder now holding the old contents."""
    if target.exists() or target.is_symlink():
        if exchange(tmp, target):
            return tmp                   # tmp now holds the old directory
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            os.replace(old, target)
            raise
        return old
    os.replace(tmp, target)
    return None


@contextlib.contextmanager
def atomic_directory(target: PathLike, overwrite: bool = True,
                     wait_lock: float = 0.0) -> Iterator[Path]:
    """Build a directory in a temporary sibling, then swap it in as ``target``.

    On success an existing ``target`` is replaced (only if ``overwrite``); on any
    exception (including KeyboardInterrupt) the old ``target`` stays as it was.  The
    whole build holds :func:`write_lock` of ``target`` (``wait_lock`` seconds to wait for
    another writer; 0 fails at once).
    """
    target = Path(target).absolute()
    with write_lock(target, wait_s=wait_lock):
        clean_leftovers(target)
        if target.exists() and not overwrite:
            raise FileExistsError(f"{target} exists (pass overwrite to replace it)")
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-",
                                        dir=target.parent))
            os.chmod(tmp, DIR_MODE)
        except OSError as exc:
            if exc.errno in _WRITE_FIXES:
                raise output_error(exc, target) from None
            raise
        try:
            yield tmp
            old = _swap_in(tmp, target)
        except BaseException as exc:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
            if is_output_os_error(exc, tmp):
                raise output_error(exc, target) from None
            raise
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
