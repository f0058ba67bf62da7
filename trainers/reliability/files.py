"""Files that are either the old version or the complete new one, never a torn mix.

``atomic_write`` writes ``<path>.tmp-<pid>`` next to the destination, fsyncs it, ``os.replace``s it over the
destination (atomic on POSIX within one file system) and fsyncs the folder. A failed write removes the temporary file
and raises ``StorageError`` naming the file and the OS error; the previous file is untouched. A process killed while
writing leaves its ``.tmp-<pid>`` file behind, which ``remove_stale_temporaries`` deletes on the next start.

Imports only the standard library and ``conf.errors``, so it is cheap to use anywhere (and in a test's child process).
"""
from __future__ import annotations

import errno
import io
import os
from pathlib import Path
from typing import Callable

from conf.errors import UserError



class StorageError(UserError):
    """A file of the run could not be written (disk full, file too large, read-only file system, permissions)."""


def describe_os_error(exc: OSError) -> str:
    """``[Errno 28] No space left on device`` -> a sentence that says what to do about it."""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{reason} (errno {exc.errno}): free space or give the run a larger disk"
    if exc.errno == errno.EFBIG:
        return f"{reason} (errno {exc.errno}): a file-size limit (ulimit -f) or the file system's largest file size"
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"{reason} (errno {exc.errno}): the folder is not writable"
    return f"{reason} (errno {exc.errno})"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some file systems do not open directories; the rename itself is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _discard(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass  # its folder is not usable either; there is nothing to clean up


def atomic_write(path: Path, write: Callable[[io.BufferedWriter], None], what: str) -> None:
    """Write ``path`` through ``write(file)`` into ``<path>.tmp-<pid>`` in the same folder, then rename it over
    ``path``. Any OSError removes the temporary file and raises ``StorageError``; ``path`` keeps its old content."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        _discard(tmp)
        # torch.save reports a failed write as RuntimeError("[enforce fail at inline_container.cc] ...") whose
        # context is the OSError (EFBIG/ENOSPC)
        os_error = exc if isinstance(exc, OSError) else exc.__context__ if isinstance(exc, RuntimeError) else None
        if not isinstance(os_error, OSError):
            raise
        kept = "the previous file is unchanged" if path.is_file() else "no earlier file existed"
        raise StorageError(f"could not write {what} {path}: {describe_os_error(os_error)}; {kept}") from None
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes, what: str = "file") -> None:
    atomic_write(path, lambda handle: handle.write(data), what)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete ``*.tmp-<pid>`` files a killed writer left in ``folder`` (only one job writes there); return them."""
    stale = sorted(Path(folder).glob("*.tmp-*")) if Path(folder).is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale
