"""The 16-point RHT of SPEC 1.6 and test vector T5."""

import numpy as np
import pytest
import torch

from quant import nvfp4, rht
from quant.errors import QuantError


def test_hadamard_and_sign_vector():
    h = rht.hadamard_matrix()
    expected = [[(-1) ** bin(i & j).count("1") for j in range(16)] for i in range(16)]
    assert h.tolist() == expected
    assert rht.SIGN_VECTOR == (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)
    t = rht.rht_matrix()
    assert torch.equal(t, torch.diag(torch.tensor(rht.SIGN_VECTOR, dtype=torch.float32)) @ h / 4)
    assert torch.equal(rht.rht_matrix(torch.bfloat16).float(), t)  # +-0.25 is exact in BF16


def test_orthogonal_exactly_in_float32():
    t = rht.rht_matrix()
    assert torch.equal(t @ t.t(), torch.eye(16))
    assert torch.equal(t.t() @ t, torch.eye(16))


def test_t5_transform_values():
    x = torch.zeros(16, dtype=torch.bfloat16)
    x[0], x[1], x[5] = 8, 1, -2
    y = rht.apply(x)
    assert y.dtype == torch.bfloat16
    assert y.float().tolist() == [2.75, 1.25, 2.75, 1.25, 1.75, 2.25, 1.75, 2.25] * 2


def test_t5_quantized_with_and_without_rht():
    x = torch.zeros(1, 16, dtype=torch.bfloat16)
    x[0, 0], x[0, 1], x[0, 5] = 8, 1, -2
    q = nvfp4.quantize(x, rht=True)
    assert q.rht and q.amax.item() == 2.75  # the post-RHT amax
    s_enc, s_dec = nvfp4.global_scales(q.amax)
    assert s_enc.item() == float(np.float32(2688) / np.float32(2.75))
    assert q.scales.tolist() == [[0x7E]]
    encode = np.float32(1) / np.float32(np.float32(448) * np.float32(s_dec.item()))
    assert encode == pytest.approx(2.1818180, rel=1e-7)
    assert nvfp4.unpack_codes(q)[0].tolist() == [7, 5, 7, 5, 6, 6, 6, 6] * 2
    f = np.float32(np.float32(448 * 2.75) * np.float32(nvfp4.INV_2688))
    expected = [float(np.float32(v * f)) for v in (6.0, 3.0, 6.0, 3.0, 4.0, 4.0, 4.0, 4.0)] * 2
    dq = nvfp4.dequantize(q)[0].tolist()
    assert dq == expected
    assert dq[:8] == pytest.approx([2.75, 1.375, 2.75, 1.375, 1.8333334, 1.8333334, 1.8333334, 1.8333334], rel=1e-7)

    plain = nvfp4.quantize(x)
    assert plain.amax.item() == 8.0
    assert nvfp4.unpack_codes(plain)[0].tolist() == [7, 2, 0, 0, 0, 0xB] + [0] * 10
    assert nvfp4.dequantize(plain)[0, :6].tolist() == pytest.approx([8, 1.3333334, 0, 0, 0, -2], rel=1e-7)


def test_apply_matches_float64_reference_rounded_once_to_bf16():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 48, generator=g).to(torch.bfloat16)
    chunks = x.double().reshape(64, 3, 16)
    exact = chunks @ rht.rht_matrix(torch.float64)  # exact: 16 BF16 products over a narrow range
    assert torch.equal(exact.float().double(), exact)  # so the FP32 sum is exact too
    assert torch.equal(rht.apply(x), exact.float().to(torch.bfloat16).reshape(64, 48))


def test_quantize_uses_the_transformed_bf16_tensor():
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    q = nvfp4.quantize(x, rht=True)
    rotated = rht.apply(x)
    assert q.amax.item() == rotated.float().abs().max().item()
    plain = nvfp4.quantize(rotated)
    assert torch.equal(q.codes, plain.codes) and torch.equal(q.scales, plain.scales)
    assert torch.equal(nvfp4.dequantize(q), nvfp4.dequantize(plain))


def test_transform_cancels_in_the_wgrad_dot_product():
    g = torch.Generator().manual_seed(2)
    dy_t, x_t = (torch.randn(12, 128, generator=g).to(torch.bfloat16) for _ in range(2))  # [features, tokens]
    rotated = rht.apply(dy_t).double() @ rht.apply(x_t).double().t()
    plain = dy_t.double() @ x_t.double().t()
    assert torch.allclose(rotated, plain, rtol=0, atol=0.15)  # only the BF16 rounding of the RHT output remains
    undone = nvfp4.dequantize(nvfp4.quantize(x_t, rht=True), undo_rht=True)
    assert (undone - x_t.float()).abs().max() < 0.5 * x_t.float().abs().max()
    assert torch.allclose(rht.invert(rht.apply(x_t)), x_t.float(), rtol=2**-7, atol=2**-7)


def test_rejects_non_bf16_and_ragged_last_dim():
    with pytest.raises(QuantError, match="only supported for bfloat16"):
        rht.apply(torch.ones(2, 16, dtype=torch.float16), name="fc2 grad_output")
    with pytest.raises(QuantError, match=r"'fc2 input'.*multiple of 16"):
        nvfp4.quantize(torch.ones(2, 24, dtype=torch.bfloat16), rht=True, name="fc2 input")
