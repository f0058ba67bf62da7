"""The rank-aware ``SeededSampler``: ranks share out each epoch so that their b-th local batches together are the
single-process b-th batch of twice the size (same samples, same augmentation seeds), ``set_epoch`` reaches it under
Lightning's DDP (Lightning keeps it instead of wrapping it in a DistributedSamplerWrapper, which would drop
``set_epoch`` and repeat epoch 0's augmentation seeds every epoch)."""
from __future__ import annotations

import lightning as L
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.pytorch.trainer.states import RunningStage
from torch.utils.data import DataLoader

from data.sampling import SeededSampler

LOCAL_BATCH = 3


def batches(keys: list, size: int) -> list[list]:
    return [keys[i:i + size] for i in range(0, len(keys) - size + 1, size)]


def test_ranks_split_each_global_batch_and_keep_the_augmentation_seeds():
    n, world = 20, 2
    for epoch in (0, 1):
        single = SeededSampler(n, seed=4)
        single.set_epoch(epoch)
        ranks = [SeededSampler(n, seed=4, num_replicas=world, rank=r) for r in range(world)]
        for sampler in ranks:
            sampler.set_epoch(epoch)
        local = [batches(list(sampler), LOCAL_BATCH) for sampler in ranks]
        for step, global_batch in enumerate(batches(list(single), LOCAL_BATCH * world)):
            assert sorted(local[0][step] + local[1][step]) == sorted(global_batch)
        assert len(ranks[0]) == len(ranks[1]) == n // world
    assert list(SeededSampler(n, 4, num_replicas=2, rank=0)) != list(ranks[0])  # epoch 1 differs from epoch 0


def test_uneven_datasets_are_padded_by_wrapping_around():
    single = list(SeededSampler(5, seed=1))
    ranks = [list(SeededSampler(5, seed=1, num_replicas=2, rank=r)) for r in range(2)]
    assert [len(keys) for keys in ranks] == [3, 3]
    assert ranks[0] == [single[0], single[2], single[4]] and ranks[1] == [single[1], single[3], single[0]]


def test_lightning_keeps_the_sampler_under_ddp_and_sets_its_epoch():
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    sampler = SeededSampler(8, seed=0, num_replicas=2, rank=1)
    loader = DataLoader(range(8), sampler=sampler, batch_size=2)
    prepared = trainer._data_connector._prepare_dataloader(loader, shuffle=True, mode=RunningStage.TRAINING)
    assert prepared.sampler is sampler
    _set_sampler_epoch(prepared, 3)  # what Lightning's fit loop calls at the start of epoch 3
    assert sampler.epoch == 3
