"""quant.gemm: the scaled-codes NVFP4 GEMM equals TE's arithmetic (SPEC 1.8) against a float64 reference."""
import numpy as np
import pytest
import torch

from qat_reference import decode_scaled_codes, exact_fp32_sum, round_like_epilogue, te_alpha, max_ulps
from quant import gemm, nvfp4


def _operands(seed: int, m: int = 24, n: int = 32, k: int = 48):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=gen) * 3).to(torch.bfloat16)
    w = torch.randn(n, k, generator=gen) * 0.05
    return nvfp4.quantize(x, tile=(1, 16)), nvfp4.quantize(w, tile=(16, 16))


def test_prepare_returns_scaled_codes_and_te_alpha():
    xq, wq = _operands(0)
    a32, b32, alpha = gemm.prepare(xq, wq, torch.bfloat16)
    assert a32.dtype == torch.float32 and b32.dtype == torch.float32
    np.testing.assert_array_equal(a32.numpy(), decode_scaled_codes(xq))
    np.testing.assert_array_equal(b32.numpy(), decode_scaled_codes(wq))
    value = alpha.value()
    assert value.dtype == torch.float32
    assert np.float32(value.item()).view(np.uint32) == te_alpha(xq.amax, wq.amax).view(np.uint32)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1])
def test_nvfp4_mm_is_bit_exact_where_fp32_accumulation_is_exact(seed, out_dtype):
    xq, wq = _operands(seed)
    bias = torch.randn(32, generator=torch.Generator().manual_seed(seed + 10)).to(out_dtype)
    y = gemm.mm(xq, wq, out_dtype, bias)  # [24, 32]
    a, b = decode_scaled_codes(xq), decode_scaled_codes(wq)
    exact = exact_fp32_sum(a, b)
    assert exact.mean() > 0.9, "test data must mostly have exact FP32 sums, or the bitwise check is vacuous"
    ref = round_like_epilogue(a @ b.T, te_alpha(xq.amax, wq.amax), out_dtype, bias.float().numpy())
    mask = torch.from_numpy(exact)
    assert torch.equal(y[mask].view(torch.int16 if out_dtype == torch.bfloat16 else torch.int32),
                       ref[mask].view(torch.int16 if out_dtype == torch.bfloat16 else torch.int32))
    # Elsewhere only the FP32 summation order may differ: within a few ulps of the output dtype.
    assert max_ulps(y[~mask], ref[~mask]) <= 2


def test_mixed_operands_use_te_dequantized_values_in_the_compute_dtype():
    xq, _ = _operands(2)
    w = torch.randn(8, 48, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    y = gemm.mm(xq, w, torch.bfloat16)
    x_hat = nvfp4.dequantize(xq, dtype=torch.bfloat16)  # TE's dequant formula, rounded to BF16
    ref = (x_hat.double() @ w.double().T).to(torch.bfloat16)
    assert max_ulps(y, ref) <= 1


def test_dense_operands_are_a_float32_gemm_rounded_once():
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(5, 16, generator=gen).to(torch.bfloat16)
    b = torch.randn(7, 16, generator=gen).to(torch.bfloat16)
    bias = torch.randn(7, generator=gen)
    y = gemm.mm(a, b, torch.bfloat16, bias)
    ref = ((a.double() @ b.double().T) + bias.double()).to(torch.bfloat16)
    assert max_ulps(y, ref) <= 1


def test_dense_returns_2d_dequantized_values():
    xq, _ = _operands(4)
    values = gemm.dense(xq, torch.bfloat16)
    assert values.shape == (24, 48) and values.dtype == torch.bfloat16
    assert torch.equal(values, nvfp4.dequantize(xq, dtype=torch.bfloat16))
    t = torch.ones(2, 3)
    assert gemm.dense(t, torch.bfloat16) is t
