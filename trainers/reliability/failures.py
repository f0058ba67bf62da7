"""What a failed job leaves behind and how it is told to the user.

Why here: the app must turn every failure a user can act on into one message without a traceback (wrong config,
unreadable data or checkpoint, NaN/Inf, a full disk) while a bug keeps its traceback, and a multirun must learn
which of its jobs failed even when they ran in other processes (joblib, submitit launchers). Each failed job
therefore writes ``<job dir>/failure.json`` (what failed, the message, the traceback for bugs); a successful run
removes a stale one. ``trainers.reliability.multirun.JobsSummary`` collects them.

Disk problems surface in many shapes: ``OSError`` from our own writes, ``RuntimeError`` from ``torch.save`` with the
OSError as its context, ``RuntimeError("an analysis figure could not be written")`` from the figure thread with the
OSError as its cause. ``storage_cause`` finds the OSError in the exception chain so all of them read the same.
"""
from __future__ import annotations

import errno
import json
import traceback
from pathlib import Path

import quant
from conf.errors import UserError
from trainers.reliability.files import atomic_write_bytes, describe_os_error

FAILURE_FILE = "failure.json"
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def storage_cause(exc: BaseException) -> OSError | None:
    """The OSError (disk full, file too large, read-only, permission) somewhere in ``exc``'s cause/context chain."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _STORAGE_ERRNOS:
            return current
        current = current.__cause__ or current.__context__
    return None


def user_message(exc: BaseException, output_dir: Path) -> str | None:
    """One message for a failure the user can act on; None for a bug (which keeps its traceback)."""
    if isinstance(exc, (UserError, quant.QuantError)):
        return str(exc)
    cause = storage_cause(exc)
    if cause is None:
        return None
    where = f" {cause.filename}" if cause.filename else ""
    doing = str(exc).splitlines()[0] if exc is not cause else "writing a file"
    return (f"could not write{where} while {doing}: {describe_os_error(cause)}. Files already written in {output_dir} "
            "are intact (checkpoints are replaced atomically, so checkpoints/last.ckpt is the last complete one).")


def record_failure(output_dir: Path, exc: BaseException, message: str | None) -> None:
    """Write ``failure.json``; never raises (the disk may be the problem)."""
    record = {"error": type(exc).__name__, "message": message or str(exc),
              "traceback": None if message else "".join(traceback.format_exception(exc))}
    try:
        atomic_write_bytes(Path(output_dir) / FAILURE_FILE, (json.dumps(record, indent=2) + "\n").encode(),
                           "failure record")
    except Exception:  # noqa: BLE001 - nothing more to save
        pass


def clear_failure(output_dir: Path) -> None:
    (Path(output_dir) / FAILURE_FILE).unlink(missing_ok=True)
