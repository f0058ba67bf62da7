"""Logging analysis artefacts to the job's W&B run with a bounded number of keys.

Why a payload object: W&B's budgets are per key (< 10k distinct keys per project, < 50k media points per key), so
analysis logs one key per *kind* of figure (a list of captioned images), one key per table, and histograms only
for the few image layers. Everything of one analysis step goes out in a single ``log`` call through the
``WandbLogger`` found in ``trainer.loggers`` (it adds ``trainer/global_step``, the x-axis of every chart).
W&B is optional: without a ``WandbLogger`` nothing is imported and nothing is logged.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from lightning.pytorch.loggers import Logger, WandbLogger


def find_wandb_logger(loggers: Iterable[Logger]) -> WandbLogger | None:
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            return logger
    return None


class WandbPayload:
    """Collects images, tables and histograms of one step, then logs them in one call."""

    def __init__(self) -> None:
        self._images: dict[str, list[tuple[Path, str]]] = {}
        self._tables: dict[str, tuple[list[str], list[list[Any]]]] = {}
        self._histograms: dict[str, tuple[Sequence[float], Sequence[float]] | Sequence[float]] = {}

    def image(self, key: str, png: Path, caption: str) -> None:
        self._images.setdefault(key, []).append((png, caption))

    def table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        self._tables[key] = (columns, rows)

    def histogram(self, key: str, values: Sequence[float] | None = None, *, counts: Sequence[float] | None = None,
                  edges: Sequence[float] | None = None) -> None:
        """Either raw ``values`` (W&B bins them) or precomputed ``counts`` with ``len(counts) + 1`` bin ``edges``."""
        self._histograms[key] = (counts, edges) if counts is not None else values  # type: ignore[assignment]

    def __len__(self) -> int:
        return len(self._images) + len(self._tables) + len(self._histograms)

    def log(self, logger: WandbLogger, step: int) -> None:
        if not len(self):
            return
        import wandb

        metrics: dict[str, Any] = {}
        for key, items in self._images.items():
            metrics[key] = [wandb.Image(str(png), caption=caption) for png, caption in items]
        for key, (columns, rows) in self._tables.items():
            metrics[key] = wandb.Table(columns=columns, data=rows)
        for key, hist in self._histograms.items():
            if isinstance(hist, tuple):
                metrics[key] = wandb.Histogram(np_histogram=(np.asarray(hist[0]), np.asarray(hist[1])))
            else:
                metrics[key] = wandb.Histogram(np.asarray(hist))
        logger.log_metrics(metrics, step=step)
