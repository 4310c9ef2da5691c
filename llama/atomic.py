"""Output directories that appear whole or not at all: the one way every writer writes.

    with atomic_output_dir(out_dir, overwrite=overwrite, inputs=[ckpt_dir]) as tmp:
        ...write every file into tmp...

The files go into a hidden temporary directory beside the destination (same file system); when the
block ends without an exception they are flushed to disk, checked by `verify` if given, given
ordinary permissions, and the directory is renamed into place. An existing destination is swapped
out in one atomic step (renameat2 RENAME_EXCHANGE on Linux) and only then deleted. So a process
killed at any moment leaves the destination absent or as it was, never a mix of old and new files;
the inputs are only read. What a killed run leaves is its hidden temporary directory, which the next
run into the same destination removes.
"""
import contextlib
import ctypes
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Union

PathLike = Union[str, Path]
_PARTIAL = ".partial-"  # .NAME.partial-PID-XXXX: a run in progress (or killed) writing NAME
_OLD = ".replaced-"  # .NAME.replaced-PID-XXXX: the previous version, being deleted


def check_destination(dst: PathLike, overwrite: bool = False, inputs: Iterable[PathLike] = ()) -> Path:
    """Refuse (ValueError, saying what to do) an output that is a file, a non-empty directory without
    `overwrite`, or equal to, inside, or holding one of `inputs`. Returns dst, absolute."""
    dst = Path(dst).resolve()
    for src in inputs:
        src = Path(src).resolve()
        if dst == src or src in dst.parents:
            raise ValueError(
                f"output {dst} is {'the input directory' if dst == src else 'inside the input ' + str(src)}: "
                "write the result to a new directory beside it"
            )
        if dst in src.parents:
            raise ValueError(f"input {src} is inside the output {dst}: replacing the output would delete it; choose another output")
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"output {dst} exists and is not a directory: choose a directory path")
    if dst.is_dir() and not overwrite:
        held = sorted(p.name for p in dst.iterdir())
        if held:
            raise ValueError(
                f"output {dst} already holds {len(held)} file(s) ({', '.join(held[:4])}{', ...' if len(held) > 4 else ''}): "
                "choose a new or empty directory, or pass --overwrite to replace it whole"
            )
    return dst


@contextlib.contextmanager
def atomic_output_dir(
    dst: PathLike,
    overwrite: bool = False,
    inputs: Iterable[PathLike] = (),
    verify: Optional[Callable[[Path], None]] = None,
) -> Iterator[Path]:
    """Yield a temporary directory to write into; on success it replaces `dst` whole (see the module).

    Refusals (check_destination) happen before anything is written. `verify(tmp)` runs on the
    complete result before it is published: raise there to keep `dst` as it was. On any exception
    the temporary directory is removed and `dst` is untouched.
    """
    dst = check_destination(dst, overwrite, inputs)
    dst.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(dst)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}{_PARTIAL}{os.getpid()}-", dir=dst.parent))
    try:
        yield tmp
        if verify is not None:
            verify(tmp)
        _finish_files(tmp)
        _publish(tmp, dst, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write one file whole or not at all: `text` goes into a hidden temporary file beside `path`,
    flushed to disk, then renamed over it (a reader sees the old file or the new one, never a part)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{_PARTIAL}{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _remove_abandoned(dst: Path) -> None:
    """Delete the temporary directories of earlier runs into `dst` whose process is gone (killed)."""
    for prefix in (_PARTIAL, _OLD):
        for path in dst.parent.glob(f".{dst.name}{prefix}*"):
            pid = path.name[len(f".{dst.name}{prefix}"):].split("-")[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _finish_files(tmp: Path) -> None:
    """Flush every file to disk (a rename is only as durable as what it names) and give files and
    directories the permissions the umask gives new ones (mkdtemp and some writers use 0600/0700)."""
    mask = os.umask(0)
    os.umask(mask)
    for root, dirs, files in os.walk(tmp):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            path = os.path.join(root, name)
            os.chmod(path, 0o666 & ~mask)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(tmp)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: Path, dst: Path, overwrite: bool) -> None:
    """Put `tmp` at `dst`: one rename when dst is absent or empty; an atomic exchange, then deletion
    of the old version, when it holds files."""
    try:
        os.rename(tmp, dst)  # POSIX: replaces an empty directory, fails on a non-empty one
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        if not overwrite:  # another run filled it while this one wrote
            raise ValueError(f"output {dst} was filled by something else while this run wrote: pass --overwrite to replace it") from None
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}{_OLD}{os.getpid()}-", dir=dst.parent))
        if _exchange(tmp, dst):  # dst is now the new version; tmp's path holds the old one
            old.rmdir()
            old = tmp
        else:  # no atomic exchange here: a kill between these two renames leaves dst absent
            os.rename(dst, old / dst.name)
            os.rename(tmp, dst)
        _fsync_dir(dst.parent)
        shutil.rmtree(old)
        return
    _fsync_dir(dst.parent)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))
