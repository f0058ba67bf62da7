"""``AtomicCheckpointIO``: Lightning's checkpoint writer, made atomic (``trainers.reliability.files``).

Why not Lightning's own ``TorchCheckpointIO``: it serialises to memory and then writes through an fsspec transaction,
which for local paths stages the bytes in ``tempfile.mkstemp()`` (the system temp dir) and moves them with
``shutil.move``. When that dir is on another file system the move is a copy into the destination, so a kill or a
full disk during the copy truncates ``last.ckpt``; nothing is fsync'ed either, and a full system temp dir fails a
save whose destination has room. Here the temporary file sits next to the destination, is fsync'ed and renamed over
it; a failed save raises ``StorageError`` and leaves the previous checkpoint as it was.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from trainers.reliability.files import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are atomic; loading is Lightning's."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        atomic_write(Path(path), lambda handle: torch.save(checkpoint, handle), "checkpoint")

    def remove_checkpoint(self, path: Any) -> None:
        Path(path).unlink(missing_ok=True)
