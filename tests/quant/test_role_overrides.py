"""Per-role formats (``Policy.role_overrides``): W4A8 layers, FP8 gradients under NVFP4, validation, reports, TE,
export and the Hydra spelling.

References are built here from the format modules' own fake quantizers (``quant.fp8``, ``quant.nvfp4``, each tested
against SPEC vectors elsewhere) and torch autograd in float64, never from ``quant.functional``/``quant.gemm``. The W4A8
forward is compared bit for bit on the outputs whose FP32 accumulation is provably exact (``qat_reference``): the
input is built so its FP8 scale is a power of two (amax 7 -> scale 64), so every FP8 value has 4 significant bits and
every product with a BF16 weight value at most 12, which is what ``exact_fp32_sum`` assumes. Backward references are
rounded to BF16 and compared within one BF16 ulp plus the FP32 summation-order slack, as in test_functional.
"""
from __future__ import annotations

import copy
import dataclasses
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quant
from conf.errors import ConfigError
from qat_reference import exact_fp32_sum, round_like_epilogue
from quant import export, fp8, nvfp4, te_backend
from quant.errors import QuantError
from tests.quant.test_functional import assert_bf16_close, quantized_layer
from tests.tiny import overrides
from trainers.app import run, validate

BF16 = torch.bfloat16
FP8_INPUT = {"input": {"format": "fp8", "options": {"fp8_format": "e4m3"}}}
FP8_GRAD = {"grad": {"format": "fp8", "options": {"fp8_format": "e5m2"}}}


def fp8_input(tokens: int, features: int) -> torch.Tensor:
    """Multiples of 1/8 in [-7, 7] with amax exactly 7: the E4M3 scale is 448/7 = 64, a power of two; about half of
    the values are not E4M3 values times 1/64, so FP8 changes them."""
    x = torch.randint(-56, 57, (tokens, features)).float() / 8
    x[0, 0] = 7.0
    return x


def fq_tokens(rows: torch.Tensor) -> torch.Tensor:
    """NVFP4 1x16 along the token (last) dim, no RHT, dequantized (float32 values), float64."""
    return nvfp4.fake_quantize(rows).double()


# ---------------------------------------------------------------------------------------------------------------------
# Numerics of mixed-format layers
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("two_d", [True, False], ids=["w16x16", "w1x16"])
def test_w4a8_linear_forward_is_fp8_input_times_nvfp4_weight_bit_for_bit(two_d):
    torch.manual_seed(0)
    recipe = quant.Recipe(disable_2d_quantization=not two_d)
    layer = quantized_layer(nn.Linear(64, 32), format="nvfp4", recipe=recipe, role_overrides=FP8_INPUT)
    x = fp8_input(24, 64)
    with torch.autocast("cpu", dtype=BF16):
        y = layer(x)
    x_hat = fp8.fake_quantize(x.to(BF16), fmt="e4m3").double()  # the activation in the compute dtype, then FP8
    assert not torch.equal(x_hat, x.double())
    w_hat = nvfp4.fake_quantize(layer.weight.detach(), tile=recipe.weight_tile).to(BF16).double()  # decoded to BF16
    a, b = x_hat.numpy(), w_hat.numpy()
    exact = torch.from_numpy(exact_fp32_sum(a, b))
    assert exact.float().mean() > 0.9
    ref = round_like_epilogue(F.linear(x_hat, w_hat).numpy(), np.float32(1), BF16,
                              layer.bias.detach().to(BF16).float().numpy())
    assert y.dtype == BF16
    assert torch.equal(y[exact].view(torch.int16), ref[exact].view(torch.int16))
    # Not the W4A4 layer: the same weights with an NVFP4 input give another output.
    w4a4 = quantized_layer(nn.Linear(64, 32), format="nvfp4", recipe=recipe)
    w4a4.load_state_dict(layer.state_dict())
    with torch.autocast("cpu", dtype=BF16):
        assert not torch.equal(w4a4(x), y)


def test_w4a8_conv_forward_is_fp8_input_times_nvfp4_weight():
    torch.manual_seed(1)
    layer = quantized_layer(nn.Conv2d(16, 32, 3, padding=1), format="nvfp4", role_overrides=FP8_INPUT)
    x = torch.randn(2, 16, 5, 5)
    with torch.autocast("cpu", dtype=BF16):
        y = layer(x)
    x_hat = fp8.fake_quantize(x.to(BF16), fmt="e4m3").double()  # per tensor: the same values in any layout
    w = layer.weight.detach()  # [Co, Ci, kh, kw]; the GEMM operand is [Co, (kh, kw, Ci)] with 16x16 tiles
    w_m = nvfp4.fake_quantize(w.permute(0, 2, 3, 1).reshape(32, -1), tile=(16, 16)).to(BF16).double()
    w_hat = w_m.reshape(32, 3, 3, 16).permute(0, 3, 1, 2)
    assert_bf16_close(y.detach(), F.conv2d(x_hat, w_hat, layer.bias.detach().to(BF16).double(), padding=1))


def _grads(policy: quant.Policy, x: torch.Tensor, dy: torch.Tensor, state=None) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(2)
    holder = nn.Sequential(nn.Linear(32, 16, bias=False))
    if state is not None:
        holder.load_state_dict(state)
    quant.apply(holder, policy)
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=BF16):
        y = holder(x)
    y.backward(dy)
    return holder[0], x.grad


@pytest.mark.parametrize("two_d", [True, False], ids=["w16x16", "w1x16"])
def test_fp8_e5m2_gradients_under_nvfp4_match_autograd_of_each_gemms_operands(two_d):
    torch.manual_seed(3)
    x, dy = torch.randn(32, 32), torch.randn(32, 16).to(BF16)
    recipe = quant.Recipe(disable_2d_quantization=not two_d)  # SR and RHT on: they must not touch the FP8 dY
    policy = quant.Policy(format="nvfp4", recipe=recipe, role_overrides=FP8_GRAD)
    layer, dx_got = _grads(policy, x, dy)
    w = layer.weight.detach()
    dy_hat = fp8.fake_quantize(dy, fmt="e5m2").double()  # per tensor: dY and dY^T hold the same values
    # dgrad: FP8 dY times W^T [K, N] in NVFP4 along N (16x16: the forward tiles), decoded to BF16
    w_t_hat = nvfp4.fake_quantize(w.t().contiguous(), tile=recipe.weight_tile).to(BF16).double()  # [K, N]
    dummy_x = torch.zeros(32, 32, dtype=torch.float64, requires_grad=True)
    (dx,) = torch.autograd.grad(F.linear(dummy_x, w_t_hat.t()), dummy_x, dy_hat)
    # wgrad: FP8 dY^T [N, T] times X^T [K, T] in NVFP4 1x16 along tokens, without the RHT (dY^T is not NVFP4)
    x_t_hat = fq_tokens(x.to(BF16).t().contiguous()).to(BF16).double()  # [K, T]
    dummy_w = torch.zeros(16, 32, dtype=torch.float64, requires_grad=True)
    (dw,) = torch.autograd.grad(F.linear(x_t_hat.t(), dummy_w), dummy_w, dy_hat)
    assert_bf16_close(dx_got, dx)
    assert_bf16_close(layer.weight.grad, dw)
    # The plain NVFP4 recipe (NVFP4 dY with SR) gives other gradients from the same weights and data.
    _, dx_nvfp4 = _grads(quant.Policy(format="nvfp4", recipe=recipe), x, dy, state={"0.weight": w})
    assert not torch.equal(dx_nvfp4, dx_got)


def test_w4a8_full_backward_runs_wgrad_without_the_rht():
    torch.manual_seed(4)
    x, dy = fp8_input(32, 32), torch.randn(32, 16).to(BF16)
    policy = quant.Policy(format="nvfp4", recipe=quant.Recipe(disable_stochastic_rounding=True),
                          role_overrides=FP8_INPUT)
    layer, _ = _grads(policy, x, dy)
    assert not layer.quantizer.wgrad_rht  # X^T is FP8: rotating only dY^T would not cancel
    assert pickle.loads(pickle.dumps(layer)).quantizer.role_formats == layer.quantizer.role_formats  # checkpoints
    dy_t_hat = fq_tokens(dy.t().contiguous()).to(BF16).double()  # [N, T] NVFP4 (RN) along tokens, no RHT
    x_hat = fp8.fake_quantize(x.to(BF16), fmt="e4m3").double()  # [T, K]
    assert_bf16_close(layer.weight.grad, dy_t_hat @ x_hat)


def test_nf4_weights_with_fp8_activations_quantize_both_roles():
    torch.manual_seed(5)
    assert quant.Policy(format="nf4", role_overrides={"input": "fp8"}).effective_roles == {"weight", "input"}
    layer = quantized_layer(nn.Linear(64, 32, bias=False), format="nf4", role_overrides={"input": "fp8"})
    x = torch.randn(8, 64)
    with torch.autocast("cpu", dtype=BF16):
        y = layer(x)
    x_hat = fp8.fake_quantize(x.to(BF16), fmt="e4m3").double()  # fp8 "hybrid": E4M3 for the input
    w_hat = quant.nf4.fake_quantize(layer.weight.detach(), blocksize=64).to(BF16).double()
    assert_bf16_close(y.detach(), x_hat @ w_hat.t())


# ---------------------------------------------------------------------------------------------------------------------
# The policy: canonical form, validation, describe, the report
# ---------------------------------------------------------------------------------------------------------------------
def test_overrides_are_canonical_hashable_and_survive_replace():
    a = quant.Policy(format="nvfp4", role_overrides={"grad": {"format": "fp8", "options": {"fp8_format": "e5m2"}},
                                                     "input": "fp8"})
    assert a.role_overrides == (("input", "fp8", (("fp8_format", "hybrid"),)),
                                ("grad", "fp8", (("fp8_format", "e5m2"),)))
    b = quant.Policy(format="nvfp4", role_overrides=a.role_overrides)
    assert a == b and hash(a) == hash(b)
    assert dataclasses.replace(a, seed=3).role_overrides == a.role_overrides
    assert a.role_format("weight").name == "nvfp4" and a.role_format("grad").element_format("grad") == "e5m2"
    # an override equal to the base format is dropped: the policy is the plain one
    assert quant.Policy(format="nvfp4", role_overrides={"grad": "nvfp4"}) == quant.Policy(format="nvfp4")


def test_roles_grow_by_the_overridden_ones_and_explicit_roles_may_use_them():
    mxfp4_fp8_grad = quant.Policy(format="mxfp4", recipe=quant.Recipe(backward="full"), role_overrides={"grad": "fp8"})
    assert mxfp4_fp8_grad.effective_roles == {"weight", "input", "grad"}
    explicit = quant.Policy(format="nf4", roles=["input", "weight"], role_overrides={"input": "int4"})
    assert explicit.roles == ("weight", "input")


@pytest.mark.parametrize("kwargs, message", [
    ({"role_overrides": {"act": "fp8"}}, "Policy.role_overrides has role 'act'; valid roles: weight, input, grad"),
    ({"role_overrides": {"input": "fp4"}},
     "Policy.role_overrides.input.format='fp4' is not valid; valid choices: nvfp4, mxfp4, nf4, int4, fp8"),
    ({"role_overrides": {"input": {"fmt": "fp8"}}}, "Policy.role_overrides.input has key 'fmt'; valid keys: format, "
                                                    "options"),
    ({"role_overrides": {"input": {"format": "fp8", "options": {"fp8_format": "e3m4"}}}},
     "Policy.role_overrides.input: fp8 option fp8_format='e3m4' is not valid; valid choices: hybrid, e4m3, e5m2"),
    ({"role_overrides": {"input": {"format": "mxfp4", "options": {"blocksize": 32}}}},
     "Policy.role_overrides.input: format=mxfp4 has no option 'blocksize'; valid options: scale_rule"),
    ({"role_overrides": {"input": "nf4"}}, "Policy.role_overrides.input.format=nf4 cannot quantize the input role "
                                           "(it quantizes weight); formats for input: nvfp4, mxfp4, int4, fp8"),
    ({"role_overrides": FP8_GRAD, "recipe": quant.Recipe(backward="dequantized")},
     "Policy.role_overrides.grad has no effect with Recipe.backward='dequantized'"),
    ({"role_overrides": FP8_INPUT, "roles": ("weight",)},
     "Policy.role_overrides.input is set but Policy.roles=['weight'] leaves input unquantized"),
    ({"role_overrides": "fp8"}, "Policy.role_overrides='fp8' is not valid; expected a mapping role -> {format, "
                                "options}"),
    ({"format": "none", "role_overrides": FP8_INPUT}, "must be empty with format='none'"),
    ({"format": "mxfp4", "role_overrides": {"input": "fp8"}, "recipe": quant.Recipe(disable_rht=True)},
     "Recipe.disable_rht=True has no effect with format=mxfp4 and role_overrides input:fp8(fp8_format=hybrid)"),
    ({"format": "mxfp4", "role_overrides": {"input": "int4"}, "amax_reduction": "world"},
     "Policy.amax_reduction='world' has no effect with format=mxfp4 and role_overrides input:int4(blocksize=32)"),
])
def test_bad_overrides_name_the_field_value_and_choices(kwargs, message):
    with pytest.raises(QuantError) as err:
        quant.Policy(**{"format": "nvfp4", **kwargs})
    assert message in str(err.value)


def test_nvfp4_switches_are_valid_when_some_role_is_nvfp4():
    policy = quant.Policy(format="fp8", role_overrides={"weight": "nvfp4"},
                          recipe=quant.Recipe(disable_2d_quantization=True))
    assert policy.role_format("weight").describe("weight", policy.recipe, False) == "nvfp4 1x16 RN"
    assert quant.Policy(format="mxfp4", role_overrides={"input": "fp8"}, amax_reduction="world").amax_reduction == \
        "world"  # the FP8 input has a per-tensor amax to reduce


def test_describe_and_report_show_each_roles_format():
    policy = quant.Policy(format="nvfp4", role_overrides={**FP8_INPUT, **FP8_GRAD})
    assert "role_overrides=input:fp8(fp8_format=e4m3),grad:fp8(fp8_format=e5m2)" in policy.describe()
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
    report = quant.apply(model, policy)
    row = report.row("0")
    assert (row.weight, row.input, row.grad) == ("nvfp4 16x16 RN", "fp8 e4m3 per-tensor", "fp8 e5m2 per-tensor")
    table = report.table()
    assert table.splitlines()[0] == f"policy: {policy.describe()}"
    assert "fp8 e4m3 per-tensor" in table and "fp8 e5m2 per-tensor" in table
    # NVFP4 input next to an FP8 dY: no wgrad RHT on the NVFP4 X^T (the plain recipe has it)
    plain = quant.apply(nn.Sequential(nn.Linear(32, 16)), quant.Policy(format="nvfp4"))
    assert plain.row("0").input == "nvfp4 1x16 RN +RHT(wgrad)"
    fp8_grad = quant.apply(nn.Sequential(nn.Linear(32, 16)), quant.Policy(format="nvfp4", role_overrides=FP8_GRAD))
    assert fp8_grad.row("0").input == "nvfp4 1x16 RN"


def test_shapes_are_checked_against_each_roles_own_blocks():
    # FP8 base (no blocks) with an NVFP4 weight: K must be a multiple of 16 for the weight
    fp8_base = quant.Policy(format="fp8", role_overrides={"weight": "nvfp4"})
    report = quant.apply(nn.Sequential(nn.Linear(24, 32)), fp8_base)
    assert "in_features=24 is not a multiple of 16: nvfp4 blocks of 16" in report.row("0").reason
    # NVFP4 base with FP8 X and W: only the NVFP4 dY is blocked (along N), so K=24 is fine and N=24 is not
    fp8_forward = quant.Policy(format="nvfp4", role_overrides={"input": "fp8", "weight": "fp8"})
    assert quant.apply(nn.Sequential(nn.Linear(24, 32)), fp8_forward).num_quantized == 1
    report = quant.apply(nn.Sequential(nn.Linear(32, 24)), fp8_forward)
    assert "out_features=24 is not a multiple of 16: with backward=full the dgrad GEMM blocks dY (nvfp4)" in \
        report.row("0").reason


def test_mixed_layers_refuse_fp16_only_when_a_role_is_nvfp4():
    w4a8 = quantized_layer(nn.Linear(32, 16), format="nvfp4", role_overrides=FP8_INPUT)
    with torch.autocast("cpu", dtype=torch.float16), pytest.raises(QuantError, match=r"NVFP4 cannot compute in "
                                                                   r"float16 \(NVFP4 roles: weight, grad"):
        w4a8(torch.randn(4, 32))
    fp8_only = quantized_layer(nn.Linear(32, 16), format="nvfp4", role_overrides={r: "fp8" for r in ("weight", "input",
                                                                                                  "grad")})
    with torch.autocast("cpu", dtype=torch.float16):
        assert fp8_only(torch.randn(4, 32)).dtype == torch.float16


# ---------------------------------------------------------------------------------------------------------------------
# Backends and export
# ---------------------------------------------------------------------------------------------------------------------
def test_te_backend_refuses_per_role_formats_by_name_and_auto_falls_back(monkeypatch):
    ready = lambda return_reason=False: (True, "") if return_reason else True  # noqa: E731
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(te_backend, "_import_te", lambda: type("TE", (), {
        "is_nvfp4_available": staticmethod(ready), "is_fp8_available": staticmethod(ready), "autocast": None}))
    assert te_backend.resolve_backend(quant.Policy(format="nvfp4")).uses_te  # TE could run the plain policy here
    policy = quant.Policy(format="nvfp4", role_overrides=FP8_INPUT)
    gap = te_backend.policy_gap(policy)
    assert gap.startswith("role_overrides=input:fp8(fp8_format=e4m3): TE's built-in recipes")
    with pytest.raises(QuantError, match=r"quant.backend=te cannot run format=nvfp4: role_overrides=input:fp8"):
        te_backend.resolve_backend(policy, "te")
    choice = te_backend.resolve_backend(policy, "auto")
    assert choice.backend == "emulated" and choice.notice() == f"quant.backend=auto runs the emulation: {gap}"
    with pytest.raises(QuantError, match="no Transformer Engine recipe for this policy: role_overrides"):
        te_backend.build_recipe(policy)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def test_w4a8_export_packs_the_nvfp4_weight_and_keeps_the_fp8_input(tmp_path):
    torch.manual_seed(6)
    net = _Net()
    quant.apply(net, quant.Policy(format="nvfp4", role_overrides=FP8_INPUT))
    net.eval()
    path = tmp_path / "w4a8.safetensors"
    export.save(net, path)
    state, meta = export.read(path)
    assert meta["format_version"] == export.ROLE_FORMATS_VERSION  # a version-1 reader refuses the file
    fc = meta["layers"]["fc"]
    assert fc["format"] == "nvfp4" and fc["role_formats"] == {"input": {"format": "fp8", "options": {"fp8_format":
                                                                                                     "e4m3"}}}
    rebuilt = _Net()
    rebuilt.load_state_dict({k: v.to(BF16).float() if v.is_floating_point() else v
                             for k, v in net.state_dict().items()})  # export stores the biases in BF16
    export.load_into(rebuilt, state).eval()
    assert rebuilt.fc.quantizer.describe_roles()["input"] == "fp8 e4m3 per-tensor"
    reference = copy.deepcopy(net)
    with torch.no_grad():
        for module in (reference.conv, reference.fc):
            module.bias.copy_(module.bias.to(BF16).float())
    x = torch.randn(2, 16, 6, 6)
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        assert torch.equal(rebuilt(x), reference(x))
    plain = _Net()
    quant.apply(plain, quant.Policy(format="nvfp4"))
    export.save(plain, tmp_path / "plain.safetensors")
    assert export.read(tmp_path / "plain.safetensors")[1]["format_version"] == export.FORMAT_VERSION


def test_export_refuses_a_weight_format_it_cannot_pack(tmp_path):
    net = _Net()
    quant.apply(net, quant.Policy(format="nvfp4", role_overrides={"weight": "fp8"}))
    with pytest.raises(QuantError, match="conv: format 'fp8' cannot be packed; packable formats: nvfp4, nf4, mxfp4"):
        export.save(net, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Hydra: the config spelling, the named W4A8 policy, and a run through the app
# ---------------------------------------------------------------------------------------------------------------------
def test_command_line_spelling_reaches_the_policy(cfg_factory):
    typed = validate(cfg_factory("quant=nvfp4", "+quant.role_overrides.grad.format=fp8",
                                 "+quant.role_overrides.grad.options.fp8_format=e5m2"))
    assert typed.quant.to_policy().role_overrides == (("grad", "fp8", (("fp8_format", "e5m2"),)),)
    typed = validate(cfg_factory("quant=nvfp4", "+quant.role_overrides.input=fp8"))
    assert typed.quant.to_policy().role_overrides == (("input", "fp8", (("fp8_format", "hybrid"),)),)
    policy = validate(cfg_factory("quant=nvfp4_w4a8")).quant.to_policy()
    assert policy == quant.Policy(format="nvfp4", recipe=quant.Recipe(backward="dequantized"),
                                  role_overrides=FP8_INPUT, seed=policy.seed)
    # NVFP4 X and dY are gone, so is the wgrad RHT: 32-true is valid
    assert validate(cfg_factory("quant=nvfp4", "quant.precision=32-true", "+quant.role_overrides.input=fp8"))


@pytest.mark.parametrize("extra, message", [
    (["quant=nvfp4", "+quant.role_overrides.input.format=fp4"],
     "quant (policy 'nvfp4'): Policy.role_overrides.input.format='fp4' is not valid; valid choices: nvfp4"),
    (["quant=fp8", "quant.precision=16-mixed", "+quant.role_overrides.weight.format=nvfp4"],
     "quant.precision=16-mixed is not valid with quant.role_overrides.weight.format=nvfp4: TE's FP4 GEMM"),
    (["quant=fp8", "quant.precision=32-true", "+quant.role_overrides.input.format=nvfp4",
      "+quant.role_overrides.grad.format=nvfp4"],
     "quant.precision=32-true is not valid with quant.role_overrides.input.format=nvfp4 and backward=full"),
])
def test_bad_config_spellings_fail_with_one_clear_message(cfg_factory, extra, message):
    with pytest.raises(ConfigError) as err:
        validate(cfg_factory(*extra))
    assert message in str(err.value)


def test_w4a8_llm_trains_two_steps_through_the_app(cfg_factory):
    cfg = cfg_factory(*overrides("llm", "quant=nvfp4_w4a8"))
    run(cfg)
    report = (Path(cfg.paths.output_dir) / "quant_report.txt").read_text()
    assert "role_overrides=input:fp8(fp8_format=e4m3)" in report
    assert "nvfp4 16x16 RN  fp8 e4m3 per-tensor" in report
