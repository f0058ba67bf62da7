"""Per-tensor FP8 with TE's current scaling: scale rule, saturating encode, dequantization."""

import numpy as np
import pytest
import torch

from quant import fp8, numerics
from quant.errors import QuantError

F32 = np.float32


@pytest.mark.parametrize(
    ("fmt", "fmt_max", "torch_dtype"), [("e4m3", 448.0, torch.float8_e4m3fn), ("e5m2", 57344.0, torch.float8_e5m2)]
)
def test_current_scaling_against_numpy_and_torch_cast(fmt, fmt_max, torch_dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(33, 70, generator=g) * torch.exp(torch.randn(33, 70, generator=g) * 3)
    q = fp8.quantize(x, fmt=fmt)
    amax = F32(np.abs(x.numpy()).max())
    scale = F32(fmt_max) / amax
    assert q.amax.item() == amax and q.scale_inv.item() == F32(F32(1) / scale)
    scaled = torch.from_numpy(x.numpy() * scale)  # float32 products
    assert torch.equal(q.data, scaled.clamp(-fmt_max, fmt_max).to(torch_dtype).view(torch.uint8))
    assert q.data.view(-1)[x.abs().argmax()].item() & 0x7F == (0x7E if fmt == "e4m3" else 0x7B)  # amax -> max
    dq = fp8.dequantize(q)
    expected = q.data.view(torch_dtype).float() * q.scale_inv
    assert torch.equal(dq, expected) and torch.equal(fp8.fake_quantize(x, fmt=fmt), dq)


def test_relative_error_of_normal_values():
    x = torch.randn(4096, generator=torch.Generator().manual_seed(1))
    for fmt, mantissa_bits in (("e4m3", 3), ("e5m2", 2)):
        q = fp8.quantize(x, fmt=fmt)
        normal = x.abs() * (1 / q.scale_inv) >= (2.0**-6 if fmt == "e4m3" else 2.0**-14)
        rel = ((fp8.dequantize(q) - x).abs() / x.abs())[normal]
        assert rel.max().item() <= 2.0 ** -(mantissa_bits + 1) * (1 + 1e-5)


def test_zero_and_tiny_amax():
    q = fp8.quantize(torch.zeros(4, 4))
    assert q.scale_inv.item() == 1.0 and q.data.eq(0).all() and fp8.dequantize(q).eq(0).all()
    tiny = torch.tensor([1e-45, 0.0])  # 448 / 1e-45 overflows: scale = FLT_MAX
    q = fp8.quantize(tiny)
    assert fp8.current_scale(q.amax, "e4m3").item() == numerics.FLT_MAX
    assert q.data.tolist() == [numerics.e4m3_encode(torch.tensor([1e-45 * numerics.FLT_MAX])).item(), 0]


def test_dtype_shape_and_errors():
    x = torch.randn(2, 3, 8, dtype=torch.bfloat16)
    y = fp8.fake_quantize(x, fmt="e5m2")
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    with pytest.raises(QuantError, match=r"valid: \('e4m3', 'e5m2'\)"):
        fp8.quantize(x, fmt="e3m4")
    with pytest.raises(QuantError, match="'dY' contains 0 NaN and 1 Inf"):
        fp8.quantize(torch.tensor([1.0, float("-inf")]), name="dY")
