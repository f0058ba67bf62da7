"""quant.te_backend on CPU: backend selection and every error path, with TE's import and hardware gate monkeypatched.

As torchtitan's float8/mx tests do, the gate is replaced rather than the feature: ``_import_te`` returns a stand-in
whose ``is_*_available(return_reason=True)`` answer what TE 2.20 answers on each GPU generation (the reason strings
are TE's own, from ``transformer_engine/pytorch/quantization.py``), and ``torch.cuda.is_available`` is forced true
where a test needs to get past the device check. Recipes are checked against stand-in classes that record their
constructor arguments; the real TE classes, layers and numerics are exercised by tests/gpu/test_te_gpu.py.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import quant
from quant import te_backend
from quant.policy import Policy
from quant.recipe import Recipe

HOPPER_NVFP4 = "Device compute capability 10.0 or higher required for NVFP4 execution."
ADA_FP8 = "Device compute capability 8.9 or higher required for FP8 execution."
OLD_CUDA_BLOCK = "FP8 block scaled GEMM requires compute capability 9.0 or higher and CUDA >= 12.9."

NVFP4 = Policy(format="nvfp4")
FP8 = Policy(format="fp8")


def fake_te(nvfp4=(False, HOPPER_NVFP4), fp8=(True, ""), block=(True, "")) -> SimpleNamespace:
    """TE's hardware gates as a device of one generation answers them (default: an H100)."""
    gate = lambda answer: (lambda return_reason=False: answer if return_reason else answer[0])  # noqa: E731
    return SimpleNamespace(is_nvfp4_available=gate(nvfp4), is_fp8_available=gate(fp8),
                           is_fp8_block_scaling_available=gate(block), autocast=None)


@pytest.fixture
def gpu(monkeypatch):
    """A CUDA device is visible; returns a setter for the TE stand-in the import gate hands out."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def install(te: object) -> None:
        monkeypatch.setattr(te_backend, "_import_te", lambda: te)

    install(fake_te())
    return install


def _no_te() -> None:
    raise ImportError("No module named 'transformer_engine'")


# ---------------------------------------------------------------------------------------------------------------------
# resolve_backend
# ---------------------------------------------------------------------------------------------------------------------
def test_hopper_auto_picks_te_for_fp8_and_the_emulation_for_nvfp4_with_tes_reason(gpu):
    fp8 = te_backend.resolve_backend(FP8, "auto")
    assert (fp8.backend, fp8.reason, fp8.notice()) == ("te", "", None)
    nvfp4 = te_backend.resolve_backend(NVFP4, "auto")
    assert (nvfp4.backend, nvfp4.reason) == ("emulated", HOPPER_NVFP4)
    assert nvfp4.notice() == f"quant.backend=auto runs the emulation: {HOPPER_NVFP4}"


def test_blackwell_runs_nvfp4_on_te(gpu):
    gpu(fake_te(nvfp4=(True, "")))
    for requested in ("auto", "te"):
        assert te_backend.resolve_backend(NVFP4, requested).uses_te


def test_te_requested_where_the_hardware_refuses_fails_with_tes_reason_and_the_hint(gpu):
    with pytest.raises(quant.QuantError) as err:
        te_backend.resolve_backend(NVFP4, "te")
    message = str(err.value)
    assert "quant.backend=te cannot run format=nvfp4" in message and HOPPER_NVFP4 in message
    assert "quant.backend=emulated" in message
    gpu(fake_te(fp8=(False, ADA_FP8)))
    with pytest.raises(quant.QuantError, match="8.9 or higher required for FP8 execution.*quant.backend=emulated"):
        te_backend.resolve_backend(FP8, "te")


def test_without_te_installed_auto_falls_back_and_te_fails_naming_the_install_command(gpu, monkeypatch):
    monkeypatch.setattr(te_backend, "_import_te", _no_te)
    choice = te_backend.resolve_backend(FP8, "auto")
    assert choice.backend == "emulated"
    assert choice.reason.startswith("Transformer Engine is not installed (No module named 'transformer_engine')")
    assert te_backend.INSTALL_COMMAND in choice.notice()
    assert te_backend.INSTALL_COMMAND == 'pip install --no-build-isolation "transformer_engine[pytorch]==2.20.2"'
    with pytest.raises(quant.QuantError) as err:
        te_backend.resolve_backend(NVFP4, "te")
    assert te_backend.INSTALL_COMMAND in str(err.value) and "quant.backend=emulated" in str(err.value)


def test_a_broken_te_install_is_reported_with_its_error(gpu, monkeypatch):
    def broken() -> None:
        raise OSError("libtransformer_engine.so: cannot open shared object file\nmore detail")

    monkeypatch.setattr(te_backend, "_import_te", broken)
    reason = te_backend.resolve_backend(FP8, "auto").reason
    assert reason.startswith("Transformer Engine failed to import (OSError: libtransformer_engine.so: cannot open")
    assert "more detail" not in reason and te_backend.INSTALL_COMMAND in reason


def test_a_te_without_autocast_is_too_old(gpu):
    old = fake_te()
    del old.autocast
    old.__version__ = "1.13.0"
    gpu(old)
    assert "Transformer Engine 1.13.0 has no te.autocast" in te_backend.resolve_backend(FP8, "auto").reason


def test_no_cuda_device_or_a_cpu_run_keeps_the_emulation(monkeypatch):
    monkeypatch.setattr(te_backend, "_import_te", lambda: pytest.fail("TE must not be imported without a GPU"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA device is visible" in te_backend.resolve_backend(FP8, "auto").reason
    assert te_backend.resolve_backend(FP8, "auto", device="cpu").reason == (
        "the run is on cpu; Transformer Engine runs on CUDA GPUs only"
    )
    with pytest.raises(quant.QuantError, match="the run is on cpu.*quant.backend=emulated"):
        te_backend.resolve_backend(FP8, "te", device="cpu")


def test_fp8_block_scaling_asks_tes_block_scaling_gate(gpu):
    gpu(fake_te(block=(False, OLD_CUDA_BLOCK)))
    assert te_backend.resolve_backend(FP8, "auto", fp8_recipe="current").uses_te
    with pytest.raises(quant.QuantError, match="CUDA >= 12.9.*quant.backend=emulated"):
        te_backend.resolve_backend(FP8, "te", fp8_recipe="block")
    # auto cannot fall back: the emulation implements current scaling only
    with pytest.raises(quant.QuantError, match="CUDA >= 12.9.*emulation implements per-tensor current scaling only"):
        te_backend.resolve_backend(FP8, "auto", fp8_recipe="block")


@pytest.mark.parametrize("requested", te_backend.BACKENDS)
def test_nvfp4_with_fp16_is_refused_on_every_backend(gpu, requested):
    gpu(fake_te(nvfp4=(True, "")))
    with pytest.raises(quant.QuantError, match=f"NVFP4 cannot compute in float16 on any backend \\(backend="
                                               f"{requested}\\).*precision=bf16-mixed"):
        te_backend.resolve_backend(NVFP4, requested, precision="16-mixed")
    assert te_backend.resolve_backend(FP8, requested, precision="16-mixed").backend in ("te", "emulated")


def test_emulated_never_consults_te(monkeypatch):
    monkeypatch.setattr(te_backend, "_import_te", lambda: pytest.fail("TE must not be imported for emulated"))
    choice = te_backend.resolve_backend(NVFP4, "emulated")
    assert (choice.backend, choice.reason, choice.notice()) == ("emulated", "", None)


@pytest.mark.parametrize("requested", te_backend.BACKENDS)
def test_format_none_runs_plain_modules_under_any_backend(monkeypatch, requested):
    monkeypatch.setattr(te_backend, "_import_te", lambda: pytest.fail("nothing to quantize, nothing to import"))
    choice = te_backend.resolve_backend(Policy(), requested)
    assert (choice.backend, choice.notice()) == ("emulated", None)


@pytest.mark.parametrize("policy, fp8_recipe, gap", [
    (Policy(format="nf4"), "current", "Transformer Engine has no recipe for format=nf4"),
    (Policy(format="mxfp4"), "current", "Transformer Engine has no recipe for format=mxfp4"),
    (Policy(format="nvfp4", roles=("weight",)), "current", "roles=['weight'] keeps grad, input in high precision"),
    (Policy(format="fp8", options={"fp8_format": "e5m2"}), "current", "fp8_format=e5m2: TE refuses pure E5M2"),
    (Policy(format="fp8", recipe=Recipe(backward="dequantized")), "delayed",
     "backward=dequantized with fp8_recipe=delayed: TE's DelayedScaling supports only backward=full"),
])
def test_policies_no_te_recipe_expresses(gpu, policy, fp8_recipe, gap):
    assert te_backend.policy_gap(policy, fp8_recipe).startswith(gap)
    with pytest.raises(quant.QuantError, match="quant.backend=te cannot run") as err:
        te_backend.resolve_backend(policy, "te", fp8_recipe=fp8_recipe)
    assert gap in str(err.value)
    if fp8_recipe == "current":
        assert te_backend.resolve_backend(policy, "auto").reason.startswith(gap)


def test_te_recipes_that_match_a_policy_exactly():
    # Without a quantized dY (backward != full), weight+input roles are what TE quantizes.
    weight_input = Policy(format="nvfp4", roles=("weight", "input"), recipe=Recipe(backward="dequantized"))
    assert te_backend.policy_gap(weight_input) is None
    for fp8_format in ("hybrid", "e4m3"):
        assert te_backend.policy_gap(Policy(format="fp8", options={"fp8_format": fp8_format}), "block") is None


def test_fp8_recipe_choice_is_validated():
    with pytest.raises(quant.QuantError, match="fp8_recipe='tensorwise' is not valid; valid choices: delayed, "
                                               "current, block"):
        te_backend.resolve_backend(FP8, "auto", fp8_recipe="tensorwise")
    with pytest.raises(quant.QuantError, match="fp8_recipe=delayed applies to format=fp8 only, not format=nvfp4"):
        te_backend.resolve_backend(NVFP4, "auto", fp8_recipe="delayed")
    with pytest.raises(quant.QuantError, match="emulation implements per-tensor current scaling only.*"
                                               "fp8_recipe=delayed"):
        te_backend.resolve_backend(FP8, "emulated", fp8_recipe="delayed")
    with pytest.raises(quant.QuantError, match="backend='cuda' is not valid; valid choices: auto, emulated, te"):
        te_backend.resolve_backend(FP8, "cuda")


# ---------------------------------------------------------------------------------------------------------------------
# build_recipe: which TE class gets which arguments (stand-in classes record them)
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class _NVFP4BlockScaling:  # the constructor fields of TE 2.20's NVFP4BlockScaling that the backend passes
    disable_rht: bool = False
    disable_stochastic_rounding: bool = False
    disable_2d_quantization: bool = False
    backward_override: object = "from-env"
    row_scaled_activation: bool = True
    nvfp4_4over6: str = "from-env"


@dataclass
class _FP8Recipe:
    fp8_format: object = None
    backward_override: object = "from-env"


class _DelayedScaling(_FP8Recipe):
    pass


class _Float8CurrentScaling(_FP8Recipe):
    pass


class _Float8BlockScaling(_FP8Recipe):
    pass


@pytest.fixture
def te_recipe_module(monkeypatch):
    module = SimpleNamespace(
        NVFP4BlockScaling=_NVFP4BlockScaling, DelayedScaling=_DelayedScaling,
        Float8CurrentScaling=_Float8CurrentScaling, Float8BlockScaling=_Float8BlockScaling,
        Format=SimpleNamespace(HYBRID="Format.HYBRID", E4M3="Format.E4M3"),
    )
    monkeypatch.setattr(te_backend, "_import_te_recipe", lambda: module)
    return module


@pytest.mark.parametrize("recipe", [Recipe(), Recipe(disable_rht=True, disable_stochastic_rounding=True),
                                    Recipe(disable_2d_quantization=True, backward="dequantized"),
                                    Recipe(backward="high_precision")])
def test_nvfp4_recipe_is_tes_with_every_numerics_argument_explicit(te_recipe_module, recipe):
    built = te_backend.build_recipe(Policy(format="nvfp4", recipe=recipe))
    assert built == _NVFP4BlockScaling(**recipe.to_te_kwargs(), row_scaled_activation=False, nvfp4_4over6="none")


@pytest.mark.parametrize("fp8_recipe, backward, fp8_format, expected", [
    ("current", "full", "hybrid", _Float8CurrentScaling("Format.HYBRID", None)),
    ("current", "dequantized", "e4m3", _Float8CurrentScaling("Format.E4M3", "dequantized")),
    ("block", "high_precision", "hybrid", _Float8BlockScaling("Format.HYBRID", "high_precision")),
    ("delayed", "full", "e4m3", _DelayedScaling("Format.E4M3", None)),
])
def test_fp8_recipes(te_recipe_module, fp8_recipe, backward, fp8_format, expected):
    policy = Policy(format="fp8", recipe=Recipe(backward=backward), options={"fp8_format": fp8_format})
    built = te_backend.build_recipe(policy, fp8_recipe)
    assert type(built) is type(expected) and built == expected


def test_build_recipe_refuses_a_policy_without_te_recipe(te_recipe_module):
    with pytest.raises(quant.QuantError, match="no Transformer Engine recipe for this policy: Transformer Engine has "
                                               "no recipe for format=int4"):
        te_backend.build_recipe(Policy(format="int4"))


# ---------------------------------------------------------------------------------------------------------------------
# te_report: which quantized layers TE runs, and why the others stay emulated
# ---------------------------------------------------------------------------------------------------------------------
class MixedNet(nn.Module):
    """Convs (no TE module), linears of TE-friendly and unfriendly shapes, and a head the model keeps in BF16."""

    high_precision_modules = ("head",)

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 32, 3, padding=1)
        self.up = nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.fc1 = nn.Linear(64, 96)
        self.fc2 = nn.Linear(96, 48)  # 48 % 16 == 0, 48 % 32 != 0
        self.fc3 = nn.Linear(48, 16, bias=False)
        self.head = nn.Linear(16, 10)


def test_te_report_puts_aligned_linears_on_te_and_says_why_the_rest_stay_emulated():
    model = MixedNet()
    emulated = quant.apply(model, NVFP4)
    types_before = {name: type(m) for name, m in model.named_modules()}
    report = te_backend.te_report(model, emulated)
    assert {name: type(m) for name, m in model.named_modules()} == types_before  # te_report only reads the model
    rows = {row.name: row for row in report.rows}
    assert rows["fc1"].backend == "te" and rows["fc1"].reason == "" and rows["fc1"].quantized
    assert rows["fc2"].backend == "emulated" and rows["fc2"].reason == (
        "out_features=48 is not a multiple of 32, which TE's NVFP4 GEMM needs: this layer runs on the emulation")
    assert rows["fc3"].reason.startswith("in_features=48 is not a multiple of 32")
    assert rows["conv"].reason == "Transformer Engine has no Conv2d module: this layer runs on the emulation"
    assert rows["up"].reason == "Transformer Engine has no ConvTranspose2d module: this layer runs on the emulation"
    assert (rows["head"].quantized, rows["head"].backend) == (False, "-")  # kept in high precision: a plain module
    assert (rows["fc1"].weight, rows["fc1"].grad) == ("nvfp4 16x16 RN", "nvfp4 1x16 SR +RHT(wgrad)")
    assert report.num_quantized == emulated.num_quantized == 5
    table = report.table()
    assert "backend" in table.splitlines()[1]
    assert "full; Transformer Engine has no Conv2d module" in table
    fp8_model = MixedNet()
    fp8_rows = te_backend.te_report(fp8_model, quant.apply(fp8_model, FP8)).rows
    assert [r.name for r in fp8_rows if r.backend == "te"] == ["fc1", "fc2", "fc3"]  # FP8 needs dims % 16 only


@pytest.mark.parametrize("fp8_recipe, weight, grad", [
    ("current", "fp8 e4m3 per-tensor", "fp8 e5m2 per-tensor"),
    ("delayed", "fp8 e4m3 per-tensor delayed", "fp8 e5m2 per-tensor delayed"),
    ("block", "fp8 e4m3 128x128", "fp8 e5m2 1x128"),
])
def test_te_rows_describe_the_fp8_recipe_that_runs(fp8_recipe, weight, grad):
    model = MixedNet()
    row = te_backend.te_report(model, quant.apply(model, FP8), fp8_recipe).row("fc1")
    assert (row.backend, row.weight, row.grad) == ("te", weight, grad)


def test_te_backend_apply_refuses_what_te_cannot_run():
    with pytest.raises(quant.QuantError, match="cannot run this policy: Transformer Engine has no recipe for "
                                               "format=nf4"):
        te_backend.apply(MixedNet(), Policy(format="nf4"))


def test_importing_quant_does_not_import_transformer_engine():
    import subprocess
    import sys

    code = "import sys, quant, quant.te_backend; print('transformer_engine' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert result.stdout.strip() == "False"


def test_job_logs_tes_reason_once_and_keeps_the_emulation(gpu, cfg_factory, caplog):
    from data.info import DataInfo
    from models import build_model
    from trainers.app import validate
    from trainers.job import Job

    cfg = cfg_factory("model=resnet", "quant=nvfp4", "trainer.accelerator=gpu", "logger=csv")
    job = Job(cfg=cfg, typed=validate(cfg))
    job.output_dir.mkdir(parents=True)
    model = build_model(job.typed.model, DataInfo(task="classification", num_classes=4, image_size=(32, 32)))
    with caplog.at_level(logging.INFO):
        report = job.apply_policy(model)
    notices = [r.getMessage() for r in caplog.records if "quant.backend=auto" in r.getMessage()]
    assert notices == [f"quant.backend=auto runs the emulation: {HOPPER_NVFP4}"]
    assert job.backend.backend == "emulated" and job.te_recipe is None
    assert {r.backend for r in report.rows if r.quantized} == {"emulated"} and report.num_quantized > 0
    assert "emulated" in (job.output_dir / "quant_report.txt").read_text()


# ---------------------------------------------------------------------------------------------------------------------
# trainers.precision: TE's autocast around the forward of every step, never around backward; FP32 masters kept
# ---------------------------------------------------------------------------------------------------------------------
class _TEAutocastProbe:
    """Stands in for te.autocast: records the recipe it was entered with and whether it is active."""

    active = False
    recipes: list = []

    def __init__(self, enabled: bool, recipe: object) -> None:
        assert enabled is True
        self.recipe = recipe

    def __enter__(self) -> None:
        type(self).active = True
        type(self).recipes.append(self.recipe)

    def __exit__(self, *exc) -> None:
        type(self).active = False


class _BackwardProbe(torch.autograd.Function):
    """Identity whose backward records whether the TE autocast is active while gradients flow."""

    seen: list = []

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        _BackwardProbe.seen.append(_TEAutocastProbe.active)
        return grad


def _fit_probe(plugin) -> tuple[list, "nn.Module"]:
    import lightning as L

    class Probe(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(8, 8)
            self.forwards: list = []

        def forward(self, x):
            self.forwards.append((_TEAutocastProbe.active, torch.is_autocast_enabled("cpu") and
                                  torch.get_autocast_dtype("cpu")))
            return _BackwardProbe.apply(self.layer(x))

        def training_step(self, batch, batch_idx):
            return self(batch[0]).float().pow(2).mean()

        def validation_step(self, batch, batch_idx):
            self(batch[0])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 8)), batch_size=4)
    module = Probe()
    trainer = L.Trainer(accelerator="cpu", devices=1, plugins=[plugin], max_steps=2, limit_val_batches=1,
                        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, inference_mode=False)
    trainer.fit(module, data, data)
    return module.forwards, module


@pytest.mark.parametrize("precision, autocast_dtype", [("bf16-mixed", torch.bfloat16), ("32-true", False)])
def test_precision_plugin_wraps_forward_only_and_keeps_fp32_masters(gpu, precision, autocast_dtype):
    from trainers.precision import build_precision_plugin

    te = fake_te()
    te.autocast = _TEAutocastProbe
    gpu(te)
    _TEAutocastProbe.recipes, _BackwardProbe.seen = [], []
    recipe = object()
    plugin = build_precision_plugin(recipe, precision, device="cpu")
    forwards, module = _fit_probe(plugin)
    assert len(forwards) == 3  # two training steps and one validation step
    assert forwards == [(True, autocast_dtype)] * 3
    assert _TEAutocastProbe.recipes == [recipe] * 3 and not _TEAutocastProbe.active
    assert _BackwardProbe.seen == [False, False]  # backward ran outside te.autocast
    assert module.layer.weight.dtype == torch.float32  # the plugin never casts the module


def test_precision_plugin_refuses_other_precisions():
    from conf.errors import ConfigError
    from trainers.precision import build_precision_plugin

    with pytest.raises(ConfigError, match="quant.precision='bf16-true' is not valid with quant.backend=te; valid "
                                          "choices: bf16-mixed, 16-mixed, 32-true"):
        build_precision_plugin(object(), "bf16-true")


def test_main_with_backend_te_where_te_cannot_run_exits_2_with_the_reason_and_the_hint(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO
    from tests.tiny import overrides

    args = [*overrides("resnet"), "quant=fp8", "quant.backend=te", "trainer.accelerator=cpu",
            f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'out'}"]
    result = subprocess.run([sys.executable, str(REPO / "main.py"), *args], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    output = result.stdout + result.stderr
    assert ("quant.backend=te cannot run format=fp8: the run is on cpu; Transformer Engine runs on CUDA GPUs "
            "only") in output
    assert "quant.backend=emulated" in output and "Traceback" not in output
