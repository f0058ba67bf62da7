"""Training order and augmentation randomness as a pure function of (seed, epoch).

Why not ``DataLoader(shuffle=True, generator=g)``: that order depends on how many epochs the generator has already
served, so a resumed run would see other batches than an uninterrupted one, and per-sample augmentation would depend
on worker scheduling. Here the sampler draws the permutation *and* one augmentation seed per sample from a
``torch.Generator`` seeded by ``(seed, epoch)``; datasets build their per-sample ``numpy`` generator from that seed.
Lightning calls ``set_epoch`` on the sampler at the start of every epoch.

Under data parallelism the sampler is rank-aware (``SeededSampler`` is a ``DistributedSampler``): Lightning would
otherwise wrap it in a ``DistributedSamplerWrapper``, which shards its output but never passes ``set_epoch`` on, so
every epoch would repeat epoch 0's order and augmentation seeds. Rank r of R takes positions r, r + R, r + 2R, ... of
the epoch's global order, so the ranks' b-th local batches together are the single-process b-th batch of R times the
size, each sample with the same augmentation seed.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

SampleKey = tuple[int, int]  # (dataset index, augmentation seed)


def mix_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from several integers (seed, epoch, index, ...)."""
    state = np.random.SeedSequence([p & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(1, dtype=np.uint64)[0]
    return int(state) >> 1


class SeededSampler(DistributedSampler):
    """Yields ``(index, augmentation_seed)`` over ``range(n)``, reshuffled per epoch as a function of (seed, epoch);
    under data parallelism only this rank's share (module docstring).

    ``num_replicas`` / ``rank`` default to the default process group's world size and rank when one exists (Lightning
    builds the train loader after it has set up the group), else to 1 and 0. The epoch's order is padded by wrapping
    around to a multiple of ``num_replicas``, as ``DistributedSampler`` does, so every rank yields the same count.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True, num_replicas: int | None = None,
                 rank: int | None = None) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        num_replicas = num_replicas if num_replicas is not None else (dist.get_world_size() if distributed else 1)
        rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        super().__init__(range(n), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.n = n

    def __iter__(self) -> Iterator[SampleKey]:
        generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        order = torch.randperm(self.n, generator=generator) if self.shuffle else torch.arange(self.n)  # [n]
        aug_seeds = torch.randint(0, 2**62, (self.n,), generator=generator)  # [n]
        keys = list(zip(order.tolist(), aug_seeds.tolist()))
        keys = (keys * -(-self.total_size // max(self.n, 1)))[: self.total_size]  # wrap-around padding
        return iter(keys[self.rank : self.total_size : self.num_replicas])

    def __len__(self) -> int:
        return self.num_samples


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
