"""The one atomic writer and the one exit-code helper shared by every command.

Atomic: data is written to a temporary file in the destination's directory
(``.<name>.lineas-tmp-*``, created with ``O_EXCL | O_NOFOLLOW`` and the mode the umask gives a new
file, not ``mkstemp``'s 0600), then renamed over the destination, so a reader never sees a
half-written file and a killed process leaves at most a hidden temp file whose name says what it
was.  Folders use the same rule in :mod:`bake.publish.outdir` (temporary sibling, then a rename
that replaces nothing it did not check: :func:`rename_noreplace`).

:func:`plain_name` is the one test for a file name that comes from an input file (a shard name in
an index, a config field): one component, no separator, not ``.``/``..``, no NUL.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import errno
import hashlib
import os
import secrets
import signal
import stat
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

TMP_MARK = ".lineas-tmp-"


class ExitCode(enum.IntEnum):
    """Process exit codes of ``lineas-train`` and ``lineas-bake`` (documented in their ``--help``)."""

    OK = 0
    FAIL = 1          # a failure that is not the user's input (Hub errors, numerical blow-up in training)
    BAD_INPUT = 2     # bad arguments, files, models or maps: the message names the offending value
    VERIFY = 3        # lineas-bake: the baked model does not reproduce the hooked model


def fail(prog: str, msg: str, code: ExitCode | int = ExitCode.BAD_INPUT) -> int:
    """Print ``<prog>: error: <msg>`` (one line per message line) to stderr and return ``code``."""
    print(f"{prog}: error: {msg}", file=sys.stderr)
    return int(code)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` on a temp file next to ``path``, then rename it to ``path``.

    The temp file is removed if ``write`` raises (or the process is interrupted by an exception).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}{TMP_MARK}{secrets.token_hex(4)}"
    os.close(open_new(tmp))  # 0666 less the umask, as any new file (mkstemp's 0600 hid maps from other users)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~current_umask())  # a writer may have replaced it with a 0600 file (safetensors 0.8)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# ----------------------------------------------------------------------------- safe file names and renames
def plain_name(value: object, what: str) -> str:
    """``value`` if it is a plain file name (one path component: not empty, no ``/`` or ``\\``, not ``.`` or
    ``..``, no NUL), else ``ValueError`` naming ``what`` and the value.  For every name taken from an input
    file and joined to a folder: such a name can only ever designate a file inside that folder."""
    ok = (isinstance(value, str) and value not in ("", ".", "..") and "/" not in value and "\\" not in value
          and "\0" not in value)
    if not ok:
        raise ValueError(f"{what} {value!r} is not a plain file name (a name inside its folder: no path "
                         "separator, no '..', not absolute)")
    return value


def open_new(path: str | os.PathLike, flags: int = os.O_WRONLY) -> int:
    """A file descriptor of a NEW file at ``path`` (``O_CREAT | O_EXCL | O_NOFOLLOW``: an existing file or a
    symlink there is an error, never truncated or followed), mode 0666 less the umask."""
    return os.open(path, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o666)


def current_umask() -> int:
    """The process umask (read from /proc where it can be, so that no other thread sees it changed)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276, "arm64": 276, "ppc64le": 357, "s390x": 347}


def _renameat2(src: bytes, dst: bytes) -> int | None:
    """renameat2(RENAME_NOREPLACE) through glibc or the raw syscall: 0, an errno, or None (not available)."""
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    fn = getattr(libc, "renameat2", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        rc = fn(_AT_FDCWD, src, _AT_FDCWD, dst, _RENAME_NOREPLACE)
    else:
        nr = _SYS_RENAMEAT2.get(os.uname().machine)
        if nr is None:
            return None
        rc = libc.syscall(ctypes.c_long(nr), ctypes.c_int(_AT_FDCWD), ctypes.c_char_p(src), ctypes.c_int(_AT_FDCWD),
                          ctypes.c_char_p(dst), ctypes.c_uint(_RENAME_NOREPLACE))
    return 0 if rc == 0 else ctypes.get_errno()


def rename_noreplace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename ``src`` to ``dst`` only if nothing is at ``dst`` (``FileExistsError`` else), atomically:
    ``renameat2(RENAME_NOREPLACE)``.  Where the kernel or file system lacks it: a file is linked to ``dst``
    (``link`` fails on an existing name) and then unlinked; a folder is renamed with ``rename``, which
    replaces at most an EMPTY folder that appeared at ``dst`` since it was found absent (never data)."""
    s, d = os.fsencode(src), os.fsencode(dst)
    err = _renameat2(s, d)
    if err == 0:
        return
    if err is not None and err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        raise OSError(err, os.strerror(err), os.fsdecode(d))
    if os.path.lexists(d):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fsdecode(d))
    if os.path.isdir(s) and not os.path.islink(s):
        os.rename(s, d)
    else:
        os.link(s, d, follow_symlinks=False)
        os.unlink(s)


# ----------------------------------------------------------------------------- folders
def follow_umask(folder: Path) -> None:
    """Give ``folder`` and everything in it the modes the umask gives new files and folders (``mkdtemp``
    makes folders 0700, ``mkstemp`` files 0600); symlinks are left alone."""
    mask = current_umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = os.path.join(root, name)
            st = os.lstat(p)
            if stat.S_ISDIR(st.st_mode):
                os.chmod(p, 0o777 & ~mask)
            elif stat.S_ISREG(st.st_mode):
                os.chmod(p, (stat.S_IMODE(st.st_mode) | 0o666) & ~mask)


def resolved_entries(folder: Path, limit: int = 100_000) -> set[Path]:
    """``folder`` and every entry under it as absolute paths, each symlink also resolved (its target is what
    reading it reads); folders reached through a symlink are not walked.  At most about ``limit`` entries."""
    found = {folder.resolve(), folder.absolute()}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(root) / name
            found.add(p.absolute())
            if p.is_symlink():
                found.add(p.resolve())
        if len(found) > limit:
            break
    return found


def name_too_long(path: Path, anchor: Path) -> str | None:
    """Why the file system under ``anchor`` would refuse ``path`` (ENAMETOOLONG), or None (40 bytes of the
    path are kept for a temporary sibling's name)."""
    try:
        name_max, path_max = os.pathconf(anchor, "PC_NAME_MAX"), os.pathconf(anchor, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    longest = max((len(os.fsencode(part)) for part in path.parts), default=0)
    if longest > name_max:
        return f"a name of {longest} bytes is longer than the file system allows ({name_max})"
    if len(os.fsencode(str(path))) + 40 > path_max:
        return f"the path is longer than the file system allows ({path_max} bytes)"
    return None


def identity(path: str | os.PathLike) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of what is at ``path`` itself (a symlink is not followed), None when nothing is."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


# ----------------------------------------------------------------------------- lock files
LOCK_SUFFIX = ".lineas-lock"


def lock_path_for(target: Path) -> Path:
    """The lock file of ``target``: ``.<name>.lineas-lock`` beside it (a hash of the name when too long)."""
    name = f".{target.name}{LOCK_SUFFIX}"
    if len(os.fsencode(name)) > 255:
        name = f".lineas-{hashlib.sha256(os.fsencode(target.name)).hexdigest()[:16]}{LOCK_SUFFIX}"
    return target.parent / name


class LockBusy(OSError):
    """The lock file is held by another process; ``holder`` is the pid it wrote there (or ``"?"``)."""

    def __init__(self, path: Path, holder: str):
        super().__init__(errno.EWOULDBLOCK, f"{path} is locked by process {holder}")
        self.path, self.holder = path, holder


def _holder(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
    except OSError:
        return "?"


def probe_lock(path: Path) -> str | None:
    """The pid written in the lock file ``path`` when another process holds it, else None (creates nothing)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder(fd)
    finally:
        os.close(fd)
    return None


def lock_file(path: Path) -> int:
    """Create (``O_NOFOLLOW``) and ``flock`` the lock file ``path``; write our pid in it; return its fd.  A
    lock file counts only while its name still points at the locked inode (:func:`unlock_file` removes it
    while it is locked).  Raises :class:`LockBusy`, or the ``OSError`` of creating it."""
    import fcntl

    for _ in range(20):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise LockBusy(path, holder) from None
        st = os.fstat(fd)
        if identity(path) == (st.st_dev, st.st_ino):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)  # removed by the run that held it, between our open and our lock: try again
    raise LockBusy(path, "?")


def unlock_file(fd: int, path: Path) -> None:
    """Remove the lock file (if it is still ours) and release it."""
    st = os.fstat(fd)
    if identity(path) == (st.st_dev, st.st_ino):
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still locked: no other process can hold a lock on this inode
    os.close(fd)


def human_size(n: float) -> str:
    """``1536`` -> ``1.5 KB`` (binary units), for messages about file and disk sizes."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover


def writable_anchor(path: str | os.PathLike) -> Path:
    """The nearest existing folder above ``path`` (where writing ``path`` would create what is missing),
    checked by creating and removing a probe in it: ``os.access`` says yes for root on read-only file
    systems.  Raises ``ValueError`` naming the folder when it is a file or cannot be written; leaves
    nothing on disk."""
    anchor = Path(path).expanduser().absolute().parent
    while not anchor.exists() and anchor != anchor.parent:
        anchor = anchor.parent
    if not anchor.is_dir():
        raise ValueError(f"{str(anchor)!r} is a file, so no folder can be created under it")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".lineas-probe-", dir=anchor))
    except OSError as e:
        raise ValueError(f"cannot write in {str(anchor)!r} ({e.strerror or e})") from None
    return anchor


class Terminated(BaseException):
    """SIGTERM arrived (a BaseException, so no ``except Exception`` swallows it)."""


@contextlib.contextmanager
def sigterm_raises_once() -> Iterator[None]:
    """Within the block SIGTERM raises :class:`Terminated`, once: a second SIGTERM while the first is handled
    is ignored, so the cleanup runs to its end.  The previous handler comes back on exit.  Main thread only
    (elsewhere signals cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum, frame):
        if not fired:
            fired.append(signum)
            raise Terminated("terminated by SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
