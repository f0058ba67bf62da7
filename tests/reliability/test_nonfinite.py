"""NaN/Inf in training: one message naming the step and where it appeared, the last good checkpoint kept.

The non-finite values are real: a learning rate of 1e30 blows the weights up after the first update, a NaN in the
input data poisons one batch. Nothing is mocked.
"""
from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from tests.reliability.support import checkpoint_step
from tests.tiny import overrides
from trainers.app import run
from trainers.reliability.nonfinite import NonFiniteGuard, locate

BLOW_UP = ("optim.lr=1e30", "optim.scheduler=none", "trainer.max_steps=6", "trainer.checkpoint_every_n_steps=1")


@pytest.mark.parametrize("family, what", [
    ("unet", r"the model's output holds NaN; first appeared: the output of layer '(?P<layer>[\w.]+)' \(\w+\)"),
    ("llm", r"\d+ gradient tensors hold NaN/Inf; first appeared: nearest the output: '(?P<layer>[\w.]+)'"),
])
def test_a_blown_up_run_stops_naming_the_step_and_layer_and_keeps_the_last_good_checkpoint(
        cfg_factory, caplog, family, what):
    cfg = cfg_factory(*overrides(family), *BLOW_UP)
    with pytest.raises(SystemExit) as stopped:
        run(cfg)
    assert stopped.value.code == 2
    message = re.search(r"non-finite values at optimizer step (?P<step>\d+) \(epoch 0, batch \d+\): " + what
                        + r".*The last good checkpoint is (?P<ckpt>\S+) \(step (?P<saved>\d+)\)", caplog.text)
    assert message, caplog.text[-2000:]
    last = Path(message["ckpt"])
    assert last == Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert checkpoint_step(last) == int(message["saved"]) == int(message["step"])  # the update that would poison it
    weights = torch.load(last, weights_only=True)["state_dict"]
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())
    names = {name for name, _ in weights.items()} | {name.rpartition(".")[0] for name in weights}
    assert message["layer"] in names or f"model.{message['layer']}" in names  # a real layer of the model


def test_skip_mode_gives_up_after_max_skipped_steps_in_a_row(cfg_factory, caplog):
    cfg = cfg_factory(*overrides("resnet"), *BLOW_UP, "trainer.nonfinite=skip", "trainer.max_skipped_steps=2")
    with pytest.raises(SystemExit) as stopped:
        run(cfg)
    assert stopped.value.code == 2
    assert caplog.text.count("(trainer.nonfinite=skip)") == 2
    assert "3 steps in a row were non-finite (trainer.max_skipped_steps=2)" in caplog.text


def test_nan_reaching_an_nvfp4_quantizer_names_the_layer_and_operand(cfg_factory, caplog):
    cfg = cfg_factory(*overrides("llm"), "quant=nvfp4", *BLOW_UP)
    with pytest.raises(SystemExit) as stopped:
        run(cfg)
    assert stopped.value.code == 2
    assert re.search(r"NVFP4: '[\w.]+ (output gradient \(dgrad\)|input|weight)[^']*' contains \d+ NaN", caplog.text)
    assert re.search(r"The quantization error below happened at optimizer step \d+", caplog.text)


class _Regression(L.LightningModule):
    """Linear -> BatchNorm -> Linear; records its weights, BN statistics and Adam state after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))
        self.after_step: list[dict[str, torch.Tensor]] = []

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        return self(batch).square().mean()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        state = {k: v.detach().clone() for k, v in self.state_dict().items()}
        for i, slot in enumerate(self.trainer.optimizers[0].state.values()):
            state.update({f"adam{i}.{k}": v.detach().clone() for k, v in slot.items()})
        self.after_step.append(state)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_skip_mode_leaves_weights_statistics_and_optimizer_state_untouched_and_carries_on(tmp_path):
    data = torch.randn(6, 4, 4, generator=torch.Generator().manual_seed(0))  # [batch, rows, features]
    data[3, 1, 2] = float("nan")  # one bad sample in batch 3
    module = _Regression()
    guard = NonFiniteGuard("skip", max_skipped_steps=1, last_checkpoint=tmp_path / "last.ckpt")
    trainer = L.Trainer(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[guard], default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(list(data), batch_size=None))
    steps = module.after_step
    assert trainer.global_step == 6 and guard.skipped_total == 1
    assert all(torch.equal(steps[2][k], steps[3][k]) for k in steps[2])  # step 3 changed nothing
    assert not all(torch.equal(steps[3][k], steps[4][k]) for k in steps[3])  # step 4 trained again
    assert all(torch.isfinite(v).all() for v in steps[-1].values() if v.is_floating_point())


def test_locate_names_the_first_layer_whose_output_is_not_finite_and_leaves_no_trace():
    task = _Regression()
    with torch.no_grad():
        task.model[2].weight.fill_(3e38)  # finite, but its output overflows to inf
    batch = torch.randn(4, 4)
    rng, stats = torch.get_rng_state(), task.model[1].running_mean.clone()
    assert locate(task, batch) == "not located (the batch has no model input to replay)"
    task.info = type("Info", (), {"task": "classification"})()
    where = locate(task, {"image": batch})
    assert re.fullmatch(r"the output of layer '2' \(Linear\) holds (Inf|NaN and Inf)", where), where
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(task.model[1].running_mean, stats)
    assert locate(task, {"image": batch.fill_(float("nan"))}) == "the input batch['image'] holds NaN (a data problem)"
