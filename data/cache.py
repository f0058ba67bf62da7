"""Generated data sets in the cache dir: named by a hash of their parameters, published atomically.

Why: several jobs of a sweep may start at once and all want the same embedded data set. Each writes into its own
temporary folder next to the target and renames it into place; ``rename`` of a folder is atomic, so a reader sees
either no folder or a complete one, and a writer that loses the race discards its copy.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from conf.errors import DataError


def params_digest(params: dict[str, Any]) -> str:
    """12 hex digits identifying a generator's parameters (JSON with sorted keys, sha256)."""
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]


def publish_dir(final: Path, write: Callable[[Path], None]) -> Path:
    """Return ``final``, creating it with ``write(tmp_dir)`` + atomic rename if it does not exist yet."""
    if final.is_dir():
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    except OSError as exc:
        raise DataError(f"cannot create the cache folder {final.parent}: {exc.strerror}; set paths.cache_dir") from None
    try:
        write(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another job published the same data set first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
