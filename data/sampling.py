"""Training order and augmentation randomness as a pure function of (seed, epoch).

Why not ``DataLoader(shuffle=True, generator=g)``: that order depends on how many epochs the generator has already
served, so a resumed run would see other batches than an uninterrupted one, and per-sample augmentation would depend
on worker scheduling. Here the sampler draws the permutation *and* one augmentation seed per sample from a
``torch.Generator`` seeded by ``(seed, epoch)``; datasets build their per-sample ``numpy`` generator from that seed.
Lightning calls ``set_epoch`` on the sampler at the start of every epoch.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

SampleKey = tuple[int, int]  # (dataset index, augmentation seed)


def mix_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from several integers (seed, epoch, index, ...)."""
    state = np.random.SeedSequence([p & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(1, dtype=np.uint64)[0]
    return int(state) >> 1


class SeededSampler(Sampler[SampleKey]):
    """Yields ``(index, augmentation_seed)`` over ``range(n)``, reshuffled per epoch as a function of (seed, epoch)."""

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        self.n = n
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[SampleKey]:
        generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        order = torch.randperm(self.n, generator=generator) if self.shuffle else torch.arange(self.n)  # [n]
        aug_seeds = torch.randint(0, 2**62, (self.n,), generator=generator)  # [n]
        return iter(zip(order.tolist(), aug_seeds.tolist()))

    def __len__(self) -> int:
        return self.n


def resolve_key(key: int | SampleKey, base_seed: int) -> tuple[int, np.random.Generator]:
    """Dataset index and augmentation generator for a sampler key.

    A plain ``int`` comes from a sampler other than ours (Lightning swaps in a ``SequentialSampler`` for
    ``overfit_batches``); its augmentation seed is then a function of (base_seed, index), still deterministic.
    """
    if isinstance(key, tuple):
        index, aug_seed = key
    else:
        index, aug_seed = int(key), mix_seed(base_seed, int(key))
    return index, np.random.default_rng(aug_seed)
