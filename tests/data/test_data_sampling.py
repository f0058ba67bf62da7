"""Training order is a pure function of (seed, epoch), also when Lightning drives the epochs."""
from __future__ import annotations

import lightning as L
import pytest
import torch

import data
from conf.schemas.data import ShapesConfig
from data.sampling import SeededSampler, resolve_key


def test_sampler_is_a_function_of_seed_and_epoch():
    def draw(seed, epoch):
        sampler = SeededSampler(50, seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    first = draw(0, 0)
    assert sorted(i for i, _ in first) == list(range(50)) and len(SeededSampler(50, 0)) == 50
    assert first == draw(0, 0)
    assert [i for i, _ in first] != [i for i, _ in draw(0, 1)]
    assert [i for i, _ in first] != [i for i, _ in draw(1, 0)]
    assert len({s for _, s in first}) == 50  # one augmentation seed per sample
    unshuffled = SeededSampler(5, 0, shuffle=False)
    assert [i for i, _ in unshuffled] == [0, 1, 2, 3, 4]


def test_plain_int_keys_are_deterministic_too():
    index, rng = resolve_key(7, base_seed=3)
    _, again = resolve_key(7, base_seed=3)
    assert index == 7 and rng.random() == again.random()
    assert resolve_key((4, 99), base_seed=3)[0] == 4


class RecordIds(L.LightningModule):
    """A one-parameter model that records which images each training step saw."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.seen: list[tuple[int, list[int]]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, batch["image_id"].tolist()))
        return (batch["image"] * self.scale).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def fit_ids(tmp_path, seed):
    cfg = ShapesConfig(num_train=24, num_val=4, batch_size=4)
    dm = data.build_datamodule(cfg, cache_dir=tmp_path, seed=seed)
    model = RecordIds()
    trainer = L.Trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", devices=1)
    trainer.fit(model, datamodule=dm)
    return model.seen


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no `validation_step`")
def test_lightning_sets_the_epoch_and_runs_repeat(tmp_path):
    seen = fit_ids(tmp_path, seed=0)
    epoch0 = [ids for epoch, ids in seen if epoch == 0]
    epoch1 = [ids for epoch, ids in seen if epoch == 1]
    assert len(epoch0) == len(epoch1) == 3 and epoch0 != epoch1  # Lightning called set_epoch
    assert seen == fit_ids(tmp_path, seed=0)


def test_single_threaded_restores_the_thread_count():
    from data.transforms import single_threaded

    @single_threaded
    def inside(fail: bool) -> int:
        if fail:
            raise ValueError("boom")
        return torch.get_num_threads()

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert inside(False) == 1 and torch.get_num_threads() == 2
        with pytest.raises(ValueError):
            inside(True)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
