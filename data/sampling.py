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

``ResumableDataLoader`` adds the position inside the epoch: Lightning stores the ``state_dict`` of a train loader
that has one in the checkpoint (``loops.fit_loop.combined_loader``) and hands it back on resume, so a run killed
mid-epoch continues with the next unseen batch instead of replaying the epoch from its start. Together with the
(seed, epoch) order this makes a resumed run see exactly the batches of an uninterrupted one.
"""
from __future__ import annotations

from itertools import islice
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

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


class _SkipFirstBatches:
    """The loader's batch sampler with its first ``skip`` batches left out (``ResumableDataLoader`` sets ``skip`` for
    the one pass that resumes; the multi-worker iterator asks for the index iterator twice while it starts)."""

    def __init__(self, batches: Iterable[list[Any]]) -> None:
        self.batches = batches
        self.skip = 0

    def __iter__(self) -> Iterator[list[Any]]:
        return islice(iter(self.batches), self.skip, None)

    def __len__(self) -> int:
        return len(self.batches)  # the full epoch: Lightning counts the skipped batches as already fetched


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position in the epoch (batches handed out) is saved and restored by Lightning.

    ``state_dict`` = ``{"epoch": the sampler's epoch, "batches": batches yielded in this pass}``, counted where the
    batches leave the loader (worker prefetching does not count). ``load_state_dict`` makes the next pass over the
    same epoch skip that many batches of indices (nothing is loaded for them); a pass over another epoch (the
    checkpoint was written at an epoch's end) starts from its beginning.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # The iterator starts lazily (after a resume has restored the global RNG), so its seed draw must not come
        # from the global RNG: that would shift every random number training draws afterwards.
        if kwargs.get("generator") is None:
            kwargs["generator"] = torch.Generator().manual_seed(0)
        super().__init__(*args, **kwargs)
        self._skipper = _SkipFirstBatches(super()._index_sampler)
        self._served = 0  # batches yielded by the current pass
        self._resume: dict[str, int] | None = None

    @property
    def _index_sampler(self) -> _SkipFirstBatches:
        return self._skipper

    def _epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", 0))

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch(), "batches": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(self._resume["epoch"])  # Lightning sets the epoch only after creating the iterator

    def __iter__(self) -> Iterator[Any]:  # a generator: runs at the first next(), after Lightning's set_epoch
        skip = 0
        if self._resume is not None and self._resume["epoch"] == self._epoch():
            skip = self._resume["batches"]
        self._resume = None
        self._served = skip
        self._skipper.skip = skip
        try:
            batches = super().__iter__()  # creates (or resets) the index iterator(s) of this pass
        finally:
            self._skipper.skip = 0
        for batch in batches:
            self._served += 1
            yield batch
