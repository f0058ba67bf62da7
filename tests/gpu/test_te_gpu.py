"""The Transformer Engine backend on a real GPU with TE installed (TE 2.20.2 on the lent H100; docs/te.md).

What runs, each part in its own test so one failure never hides another:

1. ``quant=fp8`` with each FP8 recipe (delayed, current, block) trains the LLM and a ResNet head (its ``fc`` on TE,
   its convolutions emulated) through ``trainers.app.run`` with ``quant.backend=te``; the checkpoint loads into the
   emulated model of the same config (same state_dict keys).
2. ``quant.backend=auto`` picks TE for FP8 and, where TE refuses NVFP4 (Hopper), the emulation with TE's reason
   logged once; on Blackwell it picks TE for NVFP4 too.
3. Parity of our NVFP4 emulation with TE's own: TE's pure-PyTorch NVFP4 reference (``NVFP4QuantizerRef`` inside
   ``te.Linear`` through ``recipe.CustomRecipe``; it runs on Hopper) against ``quant.QuantLinear`` with the same recipe
   options and SR off (TE-ref has none). The six quantized operands are compared byte for byte (codes, E4M3 scale
   bytes, FP32 amax), the outputs Y, dX, dW within FP32 summation-order noise (the measured errors are printed).
   Also: FP8 current scaling, TE's kernels against our emulation of Float8CurrentScaling.

Run: ``NVTE_FRAMEWORK=pytorch python3 -m pytest tests/gpu/test_te_gpu.py -m gpu -v -s``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import quant
from quant import kernels, numerics, te_backend
from quant.policy import Policy
from quant.recipe import Recipe
from tests.conftest import compose_config
from tests.tiny import overrides

TE, TE_REASON = te_backend.load_te() if torch.cuda.is_available() else (None, "no CUDA device")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(TE is None, reason=f"needs CUDA and Transformer Engine: {TE_REASON}")]

GPU = ["trainer.accelerator=gpu", "trainer.devices=1"]
# Every linear of this LLM has dims that are multiples of 64 (TE's FP8 GEMMs need 16; blocks of 128 tile them).
LLM = ["model.d_model=128", "model.n_heads=2", "model.n_kv_heads=1", "model.intermediate_size=256"]
TE_RECIPE_CLASS = {"delayed": "DelayedScaling", "current": "Float8CurrentScaling", "block": "Float8BlockScaling"}


def _run_app(overrides_: list[str], tmp_path: Path, cache: Path) -> tuple[Path, dict]:
    from trainers.app import run

    cfg = compose_config(overrides_, tmp_path, cache)
    run(cfg)
    out = Path(cfg.paths.output_dir)
    return out, json.loads((out / "run.json").read_text())


def _report_rows(out: Path) -> dict[str, str]:
    """module name -> its line of quant_report.txt (the lines between the header's dashes and the footer)."""
    lines = (out / "quant_report.txt").read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("module ")) + 2
    return {line.split()[0]: line for line in lines[first:-1] if line.strip()}


def _train_losses(out: Path) -> list[float]:
    import csv

    with open(out / "csv" / "metrics.csv") as f:
        return [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]


def _emulated_task(overrides_: list[str], tmp_path: Path, cache: Path):
    """The LightningModule of the same config on the emulated backend (for checkpoint compatibility)."""
    from trainers.app import validate
    from trainers.job import Job

    cfg = compose_config([*overrides_, "quant.backend=emulated", "quant.fp8_recipe=current"], tmp_path / "emu", cache)
    job = Job(cfg=cfg, typed=validate(cfg))
    job.output_dir.mkdir(parents=True, exist_ok=True)
    info = job.build_datamodule().info
    model = job.build_model(info)
    job.apply_policy(model)
    return job.build_task(model, info)


# ---------------------------------------------------------------------------------------------------------------------
# 1. FP8 recipes train through the app
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fp8_recipe", te_backend.FP8_RECIPES)
def test_fp8_recipe_trains_the_llm_on_te(tmp_path, shared_cache, fp8_recipe):
    args = overrides("llm", *LLM, *GPU, "quant=fp8", "quant.backend=te", f"quant.fp8_recipe={fp8_recipe}",
                     "trainer.max_steps=8", "trainer.val_check_interval=8")
    out, summary = _run_app(args, tmp_path, shared_cache)
    assert summary["quant_backend"] == "te" and TE_RECIPE_CLASS[fp8_recipe] in summary["te_recipe"]
    rows = _report_rows(out)
    decoder_linears = [name for name in rows if name.startswith("decoder.model.layers.") and "_proj" in name]
    assert len(decoder_linears) == 7 and all(" te " in rows[name] for name in decoder_linears)
    assert " te " not in rows["decoder.lm_head"] and "high_precision_modules" in rows["decoder.lm_head"]
    losses = _train_losses(out)
    print(f"\n[te fp8 {fp8_recipe}] LLM train/loss per step: {[round(v, 4) for v in losses]}")
    assert len(losses) == 8 and all(np.isfinite(losses)) and np.mean(losses[-3:]) < np.mean(losses[:3])
    state = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert not any(key.endswith("_extra_state") for key in state)
    emulated = _emulated_task(args, tmp_path, shared_cache)
    assert set(emulated.state_dict()) == set(state)
    emulated.load_state_dict(state, strict=True)  # a TE checkpoint loads into the emulated model


def _sixteen_class_image_folder(root: Path) -> Path:
    """A 16-class folder-per-class data set (2 train, 1 val image per class): 16 classes so that the ResNet's fc
    (512 -> 16) has TE-friendly dims, and batches of 16 so that every GEMM has a multiple of 8 tokens."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, per_class in (("train", 2), ("val", 1)):
        for label in range(16):
            folder = root / split / f"class{label:02d}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                base = np.array([(label * 37) % 256, (label * 91) % 256, (label * 53) % 256], dtype=np.float64)
                pixels = np.clip(base + rng.normal(0, 20, size=(32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.mark.parametrize("fp8_recipe", te_backend.FP8_RECIPES)
def test_fp8_recipe_trains_the_resnet_head_on_te_with_emulated_convolutions(tmp_path, shared_cache, fp8_recipe):
    root = _sixteen_class_image_folder(tmp_path / "images")
    args = [*overrides("resnet"), *GPU, "data=imagefolder", f"data.root={root}", "data.batch_size=16",
            "data.num_workers=0", "data.image_size=32", "quant=fp8", "quant.backend=te",
            f"quant.fp8_recipe={fp8_recipe}", "quant.model_defaults=false", "trainer.max_steps=4",
            "trainer.val_check_interval=2"]
    args = [a for a in args if not a.startswith(("data.num_train", "data.num_val"))]  # shapes_cls-only fields
    out, summary = _run_app(args, tmp_path, shared_cache)
    assert summary["quant_backend"] == "te" and summary["data"] == "imagefolder"
    rows = _report_rows(out)
    assert " te " in rows["fc"]
    convs = [line for name, line in rows.items() if "Conv2d" in line]
    assert convs and all("emulated" in line and "Transformer Engine has no Conv2d module" in line for line in convs)
    losses = _train_losses(out)
    print(f"\n[te fp8 {fp8_recipe}] ResNet-18 train/loss per step: {[round(v, 4) for v in losses]}")
    assert len(losses) == 4 and all(np.isfinite(losses))
    state = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert not any(key.endswith("_extra_state") for key in state)


# ---------------------------------------------------------------------------------------------------------------------
# 2. backend=auto
# ---------------------------------------------------------------------------------------------------------------------
def test_auto_picks_te_for_fp8(tmp_path, shared_cache, caplog):
    assert TE.is_fp8_available(return_reason=True)[0]
    with caplog.at_level(logging.INFO):
        out, summary = _run_app(overrides("llm", *LLM, *GPU, "quant=fp8"), tmp_path, shared_cache)
    assert summary["quant_backend"] == "te" and "Float8CurrentScaling" in summary["te_recipe"]
    assert not [r for r in caplog.records if "quant.backend=auto runs the emulation" in r.getMessage()]


def test_auto_runs_nvfp4_where_te_can_and_logs_tes_reason_where_it_cannot(tmp_path, shared_cache, caplog):
    available, reason = TE.is_nvfp4_available(return_reason=True)
    capability = torch.cuda.get_device_capability()
    print(f"\n[auto] compute capability {capability}: te.is_nvfp4_available -> ({available}, {reason!r})")
    if capability[0] == 9:
        assert (available, reason) == (False, "Device compute capability 10.0 or higher required for NVFP4 execution.")
    with caplog.at_level(logging.INFO):
        out, summary = _run_app(overrides("llm", *LLM, *GPU, "quant=nvfp4"), tmp_path, shared_cache)
    notices = [r.getMessage() for r in caplog.records if "quant.backend=auto runs the emulation" in r.getMessage()]
    if available:
        assert summary["quant_backend"] == "te" and not notices
    else:
        assert summary["quant_backend"] == "emulated"
        assert notices == [f"quant.backend=auto runs the emulation: {reason}"]
        rows = _report_rows(out)
        assert all(" emulated " in line for line in rows.values() if "nvfp4" in line)


def test_te_refuses_nvfp4_on_hopper_with_tes_reason_and_the_hint():
    available, reason = TE.is_nvfp4_available(return_reason=True)
    if available:
        pytest.skip("this GPU runs NVFP4 natively")
    with pytest.raises(quant.QuantError) as err:
        te_backend.resolve_backend(Policy(format="nvfp4"), "te")
    assert reason in str(err.value) and "quant.backend=emulated" in str(err.value)


def test_real_te_recipes_take_the_policy_fields():
    for recipe in (Recipe(), Recipe(disable_rht=True, disable_stochastic_rounding=True, backward="dequantized"),
                   Recipe(disable_2d_quantization=True, backward="high_precision")):
        built = te_backend.build_recipe(Policy(format="nvfp4", recipe=recipe))
        assert type(built).__name__ == "NVFP4BlockScaling"
        for key, value in recipe.to_te_kwargs().items():
            assert getattr(built, key) == value, key
    for fp8_recipe, cls in TE_RECIPE_CLASS.items():
        built = te_backend.build_recipe(Policy(format="fp8"), fp8_recipe)
        assert type(built).__name__ == cls and "HYBRID" in str(built.fp8_format)


def test_te_linear_swap_keeps_fp32_masters_and_nn_linear_state_dict_keys():
    for bias in (True, False):
        plain = nn.Sequential(nn.Linear(64, 32, bias=bias))
        reference = {k: v.clone() for k, v in plain.state_dict().items()}
        report = te_backend.apply(plain, Policy(format="fp8"))
        layer = plain[0]
        assert report.row("0").backend == "te" and type(layer).__name__ == "TELinear"
        assert isinstance(layer, TE.Linear) and layer.weight.dtype == torch.float32 and layer.weight.is_cuda
        state = plain.state_dict()
        assert set(state) == set(reference)
        assert all(torch.equal(state[k].cpu(), reference[k]) for k in reference)
        with torch.autocast("cuda", dtype=torch.bfloat16), te_backend.autocast(te_backend.build_recipe(
                Policy(format="fp8"))):
            plain(torch.randn(16, 64, device="cuda")).float().sum().backward()
        assert not any(k.endswith("_extra_state") for k in plain.state_dict())
        nn.Sequential(nn.Linear(64, 32, bias=bias)).load_state_dict(plain.state_dict())  # TE -> nn.Linear
        plain.load_state_dict(reference)  # nn.Linear -> TE, strict
        assert torch.equal(layer.weight.detach().cpu(), reference["0.weight"])


# ---------------------------------------------------------------------------------------------------------------------
# 3. Parity with TE's NVFP4 reference (CustomRecipe on Hopper)
# ---------------------------------------------------------------------------------------------------------------------
M_TOKENS, K_IN, N_OUT = 1024, 512, 256  # TE-ref's qgemm needs K % 32, N % 8 and 16-row tiles
PARITY_CONFIGS = {
    # name: (our recipe; SR off because TE-ref has none, weight dtype)
    "te-default-fp32-master": (Recipe(disable_stochastic_rounding=True), torch.float32),
    "te-default-bf16-weight": (Recipe(disable_stochastic_rounding=True), torch.bfloat16),
    "no-rht": (Recipe(disable_stochastic_rounding=True, disable_rht=True), torch.float32),
    "1d-weights": (Recipe(disable_stochastic_rounding=True, disable_2d_quantization=True), torch.float32),
}
_RECORDING_CLASSES: dict[type, type] = {}


def _tensor_kind(role: object) -> str:
    """TE's name for the tensor a quantizer slot serves ("input", "weight", "grad_output", ...)."""
    text = getattr(role, "tensor_type", None) or str(role or "")
    return next((kind for kind in ("grad_output", "grad_input", "weight", "input", "output") if kind in text), text)


def _snapshot(kind: str, src: torch.Tensor, q: object) -> dict:
    def copy(t):
        return None if t is None else t.detach().clone()

    return {"kind": kind, "src": src.detach().clone(), "data": copy(q.data), "scale": copy(q.scale),
            "data_t": copy(q.data_t), "scale_t": copy(q.scale_t), "amax_row": copy(q.global_amax_row),
            "amax_col": copy(q.global_amax_col)}


def _recording(cls: type, log: list) -> type:
    """A subclass of TE-ref's quantizer class that appends every tensor it quantizes, and what it made of it, to
    ``log`` (a class attribute, so copies of a quantizer record into the same list)."""
    if cls not in _RECORDING_CLASSES:
        class Recording(cls):
            fp4lab_log: list = []

            def quantize(self, tensor, *args, **kwargs):
                out = super().quantize(tensor, *args, **kwargs)
                self.fp4lab_log.append(_snapshot(getattr(self, "fp4lab_kind", "?"), tensor, out))
                return out

            def update_quantized(self, src, dst, *args, **kwargs):
                out = super().update_quantized(src, dst, *args, **kwargs)
                self.fp4lab_log.append(_snapshot(getattr(self, "fp4lab_kind", "?"), src, out))
                return out

        _RECORDING_CLASSES[cls] = Recording
    _RECORDING_CLASSES[cls].fp4lab_log = log
    return _RECORDING_CLASSES[cls]


def _te_reference_factory(recipe: Recipe, log: list):
    """TE's ``nvfp4_ref_rht_2d_factory`` with our recipe's RHT / 2D switches, recording what it quantizes."""
    from transformer_engine.pytorch.custom_recipes import reference_nvfp4

    def factory(role):
        q = reference_nvfp4.nvfp4_ref_rht_2d_factory(role)
        is_weight = tuple(q.quant_tile_shape) == (16, 16)  # TE's factory gives 16x16 tiles to linear weights only
        if is_weight:
            q.quant_tile_shape = recipe.weight_tile
        else:
            q.with_rht = recipe.rht
        q.__class__ = _recording(type(q), log)
        q.fp4lab_kind = "weight" if is_weight else _tensor_kind(role)
        return q

    return factory


@pytest.fixture(scope="module", params=list(PARITY_CONFIGS))
def parity(request):
    """One te.Linear(bias=False) step under TE-ref and one QuantLinear step on the same W, X, dY; what each
    quantized and computed."""
    from transformer_engine.common import recipe as te_recipe

    recipe, w_dtype = PARITY_CONFIGS[request.param]
    g = torch.Generator(device="cuda").manual_seed(1234)
    w = (torch.randn(N_OUT, K_IN, device="cuda", generator=g) * K_IN ** -0.5).to(w_dtype)
    x = torch.randn(M_TOKENS, K_IN, device="cuda", generator=g).to(torch.bfloat16)
    dy = (torch.randn(M_TOKENS, N_OUT, device="cuda", generator=g) * 1e-2).to(torch.bfloat16)

    source = nn.Linear(K_IN, N_OUT, bias=False, device="cuda", dtype=w_dtype)
    with torch.no_grad():
        source.weight.copy_(w)
    te_layer = te_backend.to_te_linear(source)
    te_log: list = []
    te_x = x.clone().requires_grad_(True)
    custom = te_recipe.CustomRecipe(qfactory=_te_reference_factory(recipe, te_log))
    with torch.autocast("cuda", dtype=torch.bfloat16), te_backend.autocast(custom):
        te_y = te_layer(te_x)
    te_y.backward(dy)

    def our_layer() -> nn.Sequential:
        layer = nn.Sequential(nn.Linear(K_IN, N_OUT, bias=False, device="cuda", dtype=w_dtype))
        with torch.no_grad():
            layer[0].weight.copy_(w)
        assert quant.apply(layer, Policy(format="nvfp4", recipe=recipe)).num_quantized == 1
        return layer

    def step(layer: nn.Sequential) -> dict[str, torch.Tensor]:
        our_x = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            our_y = layer(our_x)
        our_y.backward(dy)
        return {"Y": our_y.detach(), "dX": our_x.grad, "dW": layer[0].weight.grad}

    # The operands are recorded on the reference path (kernels off): the fast CUDA path quantizes inside fused
    # kernels that write scaled codes, and tests/quant/test_functional.py -m gpu shows it equals the reference bit
    # for bit. Its outputs are compared with TE's below as well ("ours (kernels)").
    our_log: dict = {}
    real_quantize = quant.nvfp4.quantize

    def recording_quantize(t, *args, **kwargs):
        q = real_quantize(t, *args, **kwargs)
        our_log[str(kwargs["name"])] = (t.detach().clone(), q)  # "0 input", "0 output gradient (wgrad)", ...
        return q

    with pytest.MonkeyPatch.context() as mp, kernels.disabled():
        mp.setattr(quant.nvfp4, "quantize", recording_quantize)
        reference_outputs = step(our_layer())
    kernel_outputs = step(our_layer())
    torch.cuda.synchronize()
    return {
        "name": request.param, "te_log": te_log, "our_log": our_log,
        "te": {"Y": te_y.detach(), "dX": te_x.grad, "dW": te_layer.weight.grad},
        "ours": reference_outputs, "ours (kernels)": kernel_outputs,
        "x": x, "w": w, "dy": dy,
    }


def _our_operand(parity: dict, suffix: str) -> tuple[torch.Tensor, object]:
    """(source, NVFP4Tensor) our layer used for an operand. With 16x16 weight tiles the dgrad GEMM reuses the forward's
    W codes relaid as W^T (quant.gemm.Relaid, SPEC 1.4) instead of quantizing W^T: materialise that relayout (codes
    transposed, each tile's scale byte on the rows of W^T it covers) so it compares byte for byte with TE's
    columnwise W."""
    log = parity["our_log"]
    if f"0 {suffix}" in log or suffix != "weight (dgrad)":
        return log[f"0 {suffix}"]
    src, q = log["0 weight"]
    assert q.tile == (16, 16), f"no dgrad weight operand was quantized and the forward W has tile {q.tile}"
    scales = q.scales if q.scales.dtype == torch.uint8 else q.scales.view(torch.uint8)
    relaid = dataclasses.replace(
        q, codes=numerics.pack_nibbles(quant.nvfp4.unpack_codes(q).t().contiguous()),  # [K, N/2]
        scales=scales[::16].t().repeat_interleave(16, 0).contiguous(), shape=torch.Size((K_IN, N_OUT)))  # [K, N/16]
    return src.t(), relaid


# operand -> (TE-ref tensor kind, TE field prefix "" rowwise or "_t" columnwise, our SlotRequest name suffix)
OPERANDS = {
    "X rowwise (fprop)": ("input", "", "input"),
    "W (fprop)": ("weight", "", "weight"),
    "W^T (dgrad)": ("weight", "_t", "weight (dgrad)"),
    "dY rowwise (dgrad)": ("grad_output", "", "output gradient (dgrad)"),
    "X^T along tokens, RHT (wgrad)": ("input", "_t", "input (wgrad)"),
    "dY^T along tokens, RHT (wgrad)": ("grad_output", "_t", "output gradient (wgrad)"),
}


def _te_record(parity: dict, kind: str, suffix: str) -> dict:
    """What TE-ref made of X, W or dY, found by shape (all three differ), whatever roles TE's version passes."""
    shape = {"input": (M_TOKENS, K_IN), "weight": (N_OUT, K_IN), "grad_output": (M_TOKENS, N_OUT)}[kind]
    records = [r for r in parity["te_log"] if tuple(r["src"].shape) == shape and r["data" + suffix] is not None]
    seen = sorted({(r["kind"], tuple(r["src"].shape)) for r in parity["te_log"]})
    usage = "columnwise" if suffix else "rowwise"
    assert records, f"TE-ref quantized no {shape} {kind} tensor with {usage} data; it quantized: {seen}"
    return records[0]


@pytest.mark.parametrize("operand", list(OPERANDS))
def test_parity_quantized_operands_are_byte_identical(parity, operand):
    kind, suffix, our_suffix = OPERANDS[operand]
    te = _te_record(parity, kind, suffix)
    our_src, ours = _our_operand(parity, our_suffix)
    te_codes = te["data" + suffix]
    rows = ours.codes.shape[0]
    te_scales = te["scale" + suffix].contiguous().view(torch.uint8)[:rows]
    te_amax = te["amax_col" if suffix else "amax_row"].reshape(()).float()
    label = f"[{parity['name']}] {operand}"
    print(f"\n{label}: TE quantized a {tuple(te['src'].shape)} {te['src'].dtype} tensor, ours a "
          f"{tuple(our_src.shape)} {our_src.dtype} one (tile {ours.tile}, rht {ours.rht})")
    assert te_codes.shape == ours.codes.shape, f"{label}: codes {tuple(te_codes.shape)} vs {tuple(ours.codes.shape)}"
    code_mismatch = int((te_codes != ours.codes).sum())
    scale_mismatch = int((te_scales != ours.scales).sum())
    print(f"{label}: {code_mismatch} of {te_codes.numel()} code bytes and {scale_mismatch} of {te_scales.numel()} "
          f"scale bytes differ; amax TE {te_amax.item()!r} ours {ours.amax.item()!r}")
    problems = []
    if code_mismatch or scale_mismatch:
        problems.append(f"{code_mismatch} code bytes and {scale_mismatch} scale bytes differ")
    if not torch.equal(te_amax, ours.amax.float().reshape(())):
        problems.append(f"amax TE {te_amax.item()!r} vs ours {ours.amax.item()!r}")
    if te["src"].dtype != our_src.dtype:
        problems.append(f"TE's {kind} quantizer saw {te['src'].dtype}, ours {our_src.dtype} (master weight: "
                        f"{parity['w'].dtype})")
    assert not problems, f"{label}: " + "; ".join(problems)


def _noise(name: str, ours: torch.Tensor, te: torch.Tensor) -> dict[str, float]:
    a, b = ours.float(), te.float()
    diff = (a - b).abs()
    ulp = torch.exp2(torch.floor(torch.log2(b.abs().clamp_min(2.0 ** -126))) - 7)  # one BF16 ulp of TE's value
    return {
        "max_rel_err": float(diff.max() / b.abs().max()),
        "norm_rel_err": float(diff.norm() / b.norm()),
        "bit_equal": float((a == b).float().mean()),
        "within_1_bf16_ulp": float((diff <= ulp).float().mean()),
        "max_bf16_ulps": float((diff / ulp).max()),
    }


@pytest.mark.parametrize("path", ["ours", "ours (kernels)"])
@pytest.mark.parametrize("output", ["Y", "dX", "dW"])
def test_parity_outputs_within_fp32_summation_noise(parity, output, path):
    ours, te = parity[path][output], parity["te"][output]
    assert ours.shape == te.shape and ours.dtype == te.dtype, (ours.shape, ours.dtype, te.shape, te.dtype)
    stats = _noise(output, ours, te)
    print(f"\n[{parity['name']}] {path} {output}: " + ", ".join(f"{k}={v:.3g}" for k, v in stats.items()))
    assert stats["max_rel_err"] <= 2.0 ** -7  # at most ~2 BF16 ulps of the largest value
    assert stats["within_1_bf16_ulp"] >= 0.99
    assert stats["norm_rel_err"] <= 2.0 ** -9


def test_fp8_current_scaling_te_kernels_match_our_emulation_closer_than_bf16():
    """TE's Float8CurrentScaling (cuBLAS FP8 GEMMs) vs our emulation of it (fake-quantized operands, FP32 GEMM):
    their difference (accumulation precision and order only) must be far below FP8's own error against BF16."""
    g = torch.Generator(device="cuda").manual_seed(7)
    w = torch.randn(N_OUT, K_IN, device="cuda", generator=g) * K_IN ** -0.5
    x = torch.randn(M_TOKENS, K_IN, device="cuda", generator=g).to(torch.bfloat16)
    dy = (torch.randn(M_TOKENS, N_OUT, device="cuda", generator=g) * 1e-2).to(torch.bfloat16)
    policy = Policy(format="fp8")
    results = {}
    for backend in ("te", "emulated", "bf16"):
        model = nn.Sequential(nn.Linear(K_IN, N_OUT, bias=False, device="cuda"))
        with torch.no_grad():
            model[0].weight.copy_(w)
        te_context = contextlib.nullcontext()
        if backend == "te":
            te_backend.apply(model, policy, "current")
            te_context = te_backend.autocast(te_backend.build_recipe(policy, "current"))
        elif backend == "emulated":
            quant.apply(model, policy)
        xx = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16), te_context:
            y = model(xx)
        y.backward(dy)
        results[backend] = {"Y": y.detach(), "dX": xx.grad, "dW": model[0].weight.grad}
    for output in ("Y", "dX", "dW"):
        te_vs_emulated = _noise(output, results["emulated"][output], results["te"][output])["norm_rel_err"]
        te_vs_bf16 = _noise(output, results["bf16"][output], results["te"][output])["norm_rel_err"]
        print(f"\n[fp8 current] {output}: ||emulated - TE|| / ||TE|| = {te_vs_emulated:.3g}; "
              f"||bf16 - TE|| / ||TE|| = {te_vs_bf16:.3g}")
        assert te_vs_emulated < 0.25 * te_vs_bf16
