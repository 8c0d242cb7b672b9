"""Small file-system helpers every writer shares, so that each is done one way only.

* :func:`atomic_path` - write under a hidden temporary name, rename into place on success;
* :func:`sweep_stale_partials` - remove the temporaries of writers that were killed;
* :func:`umask` - the permission bits a new file would get;
* :func:`pid_alive` - whether a process that left a lock or temporary is still running;
* :func:`sha256_file` - the checksum of a file, read in chunks.

This module sits at the bottom of the import graph (standard library only), so io, cases,
packages and the command line can all use it without cycles.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import tempfile
from pathlib import Path

# The hidden temporary of a target ``name`` is ``.<name>.<pid>@<host>.<random>.partial<suffix>``:
# the pid and host let a later run tell an abandoned temporary from one still being written.
PARTIAL_MARK = ".partial"


def umask() -> int:
    """The process's umask (read without changing it for longer than the call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def normal_file_mode() -> int:
    """What ``open(..., "w")`` would give a new file: 0666 less the umask."""
    return 0o666 & ~umask()


def pid_alive(pid: int) -> bool:
    """True when process ``pid`` on this host is running (a zombie counts as finished).

    On Windows ``os.kill`` would terminate the process, so there every process is
    assumed alive: a claim is then never taken over, which is safe, only untidy.
    """
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, ValueError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] != "Z"
    return True


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def pid_namespace() -> str:
    """This process's PID namespace (the inode of ``/proc/self/ns/pid``), or ``""`` where there is none.

    Two containers may share a host name and a folder while their pids mean different processes:
    a pid is only checked for liveness by a process in the same namespace."""
    try:
        return re.sub(r"\D", "", os.readlink("/proc/self/ns/pid"))
    except OSError:
        return ""


def boot_id() -> str:
    """This machine's boot id (Linux), or ``""``: a claim from an earlier boot is dead whatever its pid."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:16]
    except OSError:
        return ""


def host_tag() -> str:
    """Host name plus PID namespace: where a pid names one process (used in temporary names)."""
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:40] or "host"
    ns = pid_namespace()
    return f"{host}-ns{ns}" if ns else host


def owner_tag() -> str:
    return f"{os.getpid()}@{host_tag()}"


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, suffix: str | None = None):
    """Yield a temporary path beside ``target``; rename it onto ``target`` only if the block succeeds.

    The temporary keeps ``target``'s suffix (``suffix`` overrides it) because writers such as
    SimpleITK choose the format from it. On any failure the temporary is deleted, so an
    older file at ``target`` survives untouched.
    """
    target = Path(target)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise OSError(f"output folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"output folder {folder} is not writable; choose another folder or make it writable")
    tmp = make_partial(target, suffix=suffix)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def make_partial(target: Path, *, suffix: str | None = None, mark: str = PARTIAL_MARK) -> Path:
    """Create an empty hidden temporary for ``target`` (normal permissions) and return its path.

    ``mark`` ``".backup"`` names a copy of an earlier file kept while several outputs are
    renamed into place; the sweep never deletes those (they may be the only copy left).
    """
    target = Path(target)
    folder = target.parent if str(target.parent) else Path(".")
    if suffix is None:
        suffix = "".join(target.suffixes[-2:]) if target.name.lower().endswith((".nii.gz", ".seg.nrrd")) \
            else (target.suffix or ".tmp")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{owner_tag()}.", suffix=mark + suffix, dir=folder)
    os.close(fd)
    os.chmod(tmp, normal_file_mode())  # mkstemp makes 0600 files; outputs get the usual permissions
    return Path(tmp)


_PARTIAL = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)@(?P<host>[A-Za-z0-9_-]+)\.[^.]+\.partial")


def sweep_stale_partials(folder: str | os.PathLike, names: list[str] | None = None) -> list[Path]:
    """Delete hidden temporaries in ``folder`` left by writers that were killed (same host, dead pid).

    ``names`` limits the sweep to the temporaries of those target names. Temporaries of
    live processes, or written on another host, are left alone. Returns what was removed.
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    with contextlib.suppress(OSError):
        for p in folder.iterdir():
            m = _PARTIAL.match(p.name)
            if not m or (names is not None and m.group("name") not in names):
                continue
            if m.group("host") != host_tag() or pid_alive(int(m.group("pid"))):
                continue
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed


@contextlib.contextmanager
def locked(lock_file: str | os.PathLike, timeout_s: float = 600.0):
    """Hold an exclusive lock on ``lock_file`` for the block; other holders wait.

    ``lock_file`` may be a folder (nothing is created in it) or a file (created if missing).
    POSIX: ``flock``, which the kernel releases when a holder dies, so a killed process never
    leaves the lock held. Elsewhere: an exclusive lock file (``<folder>/.lock``) holding the
    owner's pid, taken over when that process is gone.
    """
    import time

    path = Path(lock_file)
    deadline = time.monotonic() + timeout_s
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        fcntl = None
    if fcntl is not None:
        fd = os.open(path, os.O_RDONLY) if path.is_dir() else os.open(path, os.O_RDWR | os.O_CREAT,
                                                                         normal_file_mode())
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{path}: still locked by another process after {timeout_s:.0f} s; "
                                           f"wait for it to finish and try again") from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)  # closing releases the flock
        return
    path = path / ".lock" if path.is_dir() else path
    while True:  # pragma: no cover - Windows
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            break
        except FileExistsError:
            with contextlib.suppress(OSError, ValueError):
                if not pid_alive(int(path.read_text().strip() or "0")):
                    path.unlink()
                    continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path}: still locked by another process; try again later") from None
            time.sleep(0.05)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def shipped_folder(packaged: str, resources: str, marker: str | None = None) -> Path:
    """A folder of data that ships with LumbarSegment: in a wheel the data-only package
    ``LumbarSegmentLib/<packaged>`` (pyproject maps ``Resources/<resources>`` there); in a source checkout
    and the installed Slicer extension ``Resources/<resources>`` beside ``LumbarSegmentLib/``. The
    in-package copy wins when it exists (holding ``marker``, when one is named), so an unrelated
    ``Resources/`` folder next to an installed package is never mistaken for it."""
    lib = Path(__file__).resolve().parents[1]  # LumbarSegmentLib/
    inside = lib / packaged
    if (inside / marker).is_file() if marker else inside.is_dir():
        return inside
    return lib.parent / "Resources" / resources
