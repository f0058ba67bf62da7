"""NVFP4 round-to-nearest quantization against SPEC_NVFP4.md section 9 and an independent naive reference.

The reference (`reference_quantize`) is deliberately different code: a per-block Python loop over numpy float32
scalars (IEEE single operations), with E4M3 and E2M1 rounding done by searching the value grids in float64 instead
of the exponent/threshold arithmetic of `quant.numerics`.
"""

import math

import numpy as np
import pytest
import torch

from quant import nvfp4
from quant.errors import QuantError

F32 = np.float32
FLT_MAX = F32(np.finfo(np.float32).max)


def bits(value) -> int:
    return int(np.asarray(value, dtype=np.float32).view(np.uint32))


def _e4m3_grid() -> list[float]:
    """The 127 non-negative finite E4M3 values, index = byte."""
    grid = [m * 2.0**-9 for m in range(8)]
    grid += [(1 + m / 8) * 2.0 ** (e - 7) for e in range(1, 16) for m in range(8)]
    return grid[:127]  # byte 0x7F is NaN


E4M3_GRID = _e4m3_grid()
E2M1_GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def nearest_even(value: float, grid: list[float]) -> int:
    """Index of the grid value nearest to value (saturating), ties to the even index (= even mantissa/code)."""
    if value >= grid[-1]:
        return len(grid) - 1
    best = min(range(len(grid)), key=lambda i: (abs(grid[i] - value), i % 2))
    return best


def reference_quantize(x: np.ndarray, tile: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """SPEC 1.2 one block at a time: float32 [M, K] -> (codes [M, K], scale bytes [M, ceil(K/16)], amax)."""
    m_rows, k = x.shape
    nb = -(-k // 16)
    with np.errstate(all="ignore"):
        amax = F32(np.abs(x).max())
        s_enc = min(F32(2688) / amax, FLT_MAX)
        if amax == 0 or s_enc == 0:
            s_enc = F32(1)
        s_dec = F32(1) / s_enc
        mult = F32(s_enc * F32(F32(1) / F32(6)))
        codes = np.zeros((m_rows, k), dtype=np.uint8)
        scales = np.zeros((m_rows, nb), dtype=np.uint8)
        for r in range(m_rows):
            for blk in range(nb):
                cols = slice(16 * blk, min(16 * blk + 16, k))
                rows = slice(r // 16 * 16, r // 16 * 16 + 16) if tile == (16, 16) else slice(r, r + 1)
                b = F32(np.abs(x[rows, cols]).max())
                s = min(F32(b * mult), F32(448))
                byte = nearest_even(float(s), E4M3_GRID)
                scales[r, blk] = byte
                e = min(F32(1) / F32(F32(E4M3_GRID[byte]) * s_dec), FLT_MAX)
                for c in range(cols.start, cols.stop):
                    y = F32(x[r, c] * e)
                    codes[r, c] = nearest_even(abs(float(y)), E2M1_GRID) | (8 if y < 0 else 0)
    return codes, scales, amax


def reference_dequantize(codes: np.ndarray, scales: np.ndarray, amax: np.float32) -> np.ndarray:
    out = np.zeros(codes.shape, dtype=np.float32)
    for r, c in np.ndindex(codes.shape):
        f = F32(F32(F32(E4M3_GRID[scales[r, c // 16]]) * amax) * F32(F32(1) / F32(2688)))
        value = E2M1_GRID[codes[r, c] & 7] * (-1 if codes[r, c] & 8 else 1)
        out[r, c] = F32(F32(value) * f)
    return out


def codes_of(q: nvfp4.NVFP4Tensor) -> list[int]:
    return nvfp4.unpack_codes(q).flatten().tolist()


# ---- SPEC section 9 vectors -------------------------------------------------------------------------------------

T1_X = [0, 0.25, 0.3125, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.25, -0.75, -2.875, -5.125, 4.5, 1.125]


def test_constants_are_the_float32_values_of_the_spec():
    assert bits(nvfp4.INV_6) == 0x3E2AAAAB
    assert bits(nvfp4.INV_2688) == 0x39C30C31
    assert nvfp4.INV_GEMM == float(F32(1) / F32(6 * 6 * 448 * 448))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_t1_identity_block(dtype):
    x = torch.tensor(T1_X, dtype=dtype)
    q = nvfp4.quantize(x)
    assert q.codes.tolist() == [[0x00, 0x21, 0x42, 0x64, 0x76, 0xA8, 0xFD, 0x26]]
    assert q.scales.tolist() == [[0x7E]]
    assert q.amax.dtype == torch.float32 and q.amax.item() == 6.0
    s_enc, s_dec = nvfp4.global_scales(q.amax)
    assert bits(s_enc.item()) == 0x43E00000 and bits(s_dec.item()) == 0x3B124925
    assert bits((s_enc * nvfp4.INV_6).item()) == 0x42955556
    dq = nvfp4.dequantize(q)
    assert dq.tolist() == [0, 0, 0.5, 1, 1, 2, 2, 4, 4, 6, -0.0, -1, -3, -6, 4, 1]
    assert torch.signbit(dq[10])  # -0.25 rounds to code 8, "-0"


def _t2_tensor() -> torch.Tensor:
    rows = [
        [6.25, 1, -3, 0.5], [6.375, 1, -3, 0.5], [6.75, 1, -3, 0.5], [7.5, 1, -3, 0.5],
        [0.01, -0.004, 0, 0.0025], [0.005, -0.001, 0, 0], [0, 0, 0, 0], [2688, -100, 448, 1],
    ]  # fmt: skip
    x = torch.zeros(8, 16)
    x[:, :4] = torch.tensor(rows)
    return x.reshape(1, 128)


def test_t2_scale_rounding_clipping_subnormal_and_zero_scales():
    q = nvfp4.quantize(_t2_tensor())
    assert q.amax.item() == 2688.0
    assert q.scales.tolist() == [[0x38, 0x38, 0x39, 0x3A, 0x01, 0x00, 0x00, 0x7E]]
    codes = nvfp4.unpack_codes(q).view(8, 16)[:, :4].tolist()
    assert codes == [[7, 2, 0xD, 1]] * 3 + [[7, 2, 0xC, 1], [7, 0xC, 0, 3], [7, 0xF, 0, 0], [0, 0, 0, 0], [7, 8, 2, 0]]
    assert q.codes[0, :2].tolist() == [0x27, 0x1D]
    assert nvfp4.unpack_codes(q).view(8, 16)[:, 4:].eq(0).all()
    dq = nvfp4.dequantize(q).view(8, 16)[:, :4]
    expected = [
        [6, 1, -3, 0.5], [6, 1, -3, 0.5], [6.75, 1.125, -3.375, 0.5625], [7.5, 1.25, -2.5, 0.625],
        [0.01171875, -0.00390625, 0, 0.0029296875], [0, 0, 0, 0], [0, 0, 0, 0], [2688, 0, 448, 0],
    ]  # fmt: skip
    assert dq.tolist() == expected


def test_t3_block_scale_is_rounded_once():
    x = torch.zeros(1, 32)
    x[0, :4] = torch.tensor([2.15625, -1.0, 0.5, 1.5])
    x[0, 16:18] = torch.tensor([2.875, 0.1])
    q = nvfp4.quantize(x)
    s_enc, s_dec = nvfp4.global_scales(q.amax)
    assert bits(s_enc.item()) == 0x4469BD38 and bits(s_dec.item()) == 0x3A8C30C3
    multiplier = s_enc * nvfp4.INV_6
    assert bits(multiplier.item()) == 0x431BD37B
    assert bits((2.15625 * multiplier).item()) == 0x43A80001  # one ulp above the E4M3 midpoint 336
    assert q.scales.tolist() == [[0x7B, 0x7E]]  # 352; the two-rounding order gives the tie 336 -> 320 (0x7A)
    two_rounding = F32(F32(F32(2.15625) / F32(6)) / F32(F32(2.875) / F32(2688)))
    assert two_rounding == 336.0 and nearest_even(float(two_rounding), E4M3_GRID) == 0x7A
    codes = nvfp4.unpack_codes(q)[0]
    assert codes[:4].tolist() == [7, 0xD, 3, 6] and codes[16:18].tolist() == [7, 0]
    f = F32(F32(F32(352) * F32(2.875)) * F32(nvfp4.INV_2688))
    dq = nvfp4.dequantize(q)[0]
    assert dq[:4].tolist() == [float(F32(v * f)) for v in (6.0, -3.0, 1.5, 4.0)]
    assert dq[:4].tolist() == pytest.approx([2.2589285, -1.1294643, 0.5647321, 1.5059524], rel=1e-7)
    assert dq[16:18].tolist() == [2.875, 0.0]


def test_t4_2d_tile_versus_1d_rows():
    w = torch.zeros(16, 16)
    w[0, 0], w[1, 0], w[1, 1] = 6.0, 0.75, -0.5
    q2d = nvfp4.quantize(w, tile=(16, 16))
    assert q2d.scales.flatten().tolist() == [0x7E] * 16  # one tile, its byte repeated on every row
    assert nvfp4.unpack_codes(q2d)[1, :2].tolist() == [2, 9]
    assert nvfp4.dequantize(q2d)[1, :2].tolist() == [1.0, -0.5]
    q1d = nvfp4.quantize(w)
    assert q1d.scales[:, 0].tolist() == [0x7E, 0x66] + [0] * 14
    assert nvfp4.unpack_codes(q1d)[1, :2].tolist() == [7, 0xE]
    assert nvfp4.dequantize(q1d)[1, :2].tolist() == [0.75, -0.5]


# ---- special cases ----------------------------------------------------------------------------------------------


def test_all_zero_tensor_uses_unit_global_scale():
    q = nvfp4.quantize(torch.zeros(3, 40))
    s_enc, s_dec = nvfp4.global_scales(q.amax)
    assert q.amax.item() == 0.0 and s_enc.item() == 1.0 and s_dec.item() == 1.0
    assert q.codes.eq(0).all() and q.scales.eq(0).all()
    assert q.codes.shape == (3, 24) and q.scales.shape == (3, 3)
    assert nvfp4.dequantize(q).eq(0).all()


def test_tiny_block_gets_zero_scale_and_decodes_to_zero():
    x = torch.zeros(1, 32)
    x[0, 0] = 1000.0
    x[0, 16:19] = torch.tensor([1e-4, -2e-4, 3e-5])  # b/A = 2e-7: s rounds to E4M3 zero
    q = nvfp4.quantize(x)
    assert q.scales[0, 1].item() == 0
    assert nvfp4.unpack_codes(q)[0, 16:19].tolist() == [7, 0xF, 7]  # x * FLT_MAX saturates to +-6
    assert nvfp4.dequantize(q)[0, 16:19].abs().max().item() == 0.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_raises_naming_the_tensor(bad):
    x = torch.randn(4, 32)
    x[2, 5] = bad
    with pytest.raises(QuantError, match=r"'layer3\.conv1 weight' contains"):
        nvfp4.quantize(x, name="layer3.conv1 weight")
    with pytest.raises(QuantError, match="the input tensor contains"):
        nvfp4.fake_quantize(x.bfloat16(), rht=True)


def test_bad_options_raise_quant_error():
    with pytest.raises(QuantError, match=r"valid tiles: \(\(1, 16\), \(16, 16\)\)"):
        nvfp4.quantize(torch.ones(4, 16), tile=(1, 32), name="w")
    with pytest.raises(QuantError, match="valid dtypes"):
        nvfp4.quantize(torch.ones(4, 16, dtype=torch.int32))
    with pytest.raises(QuantError, match="at least one dim"):
        nvfp4.quantize(torch.tensor(1.0))
    with pytest.raises(QuantError, match="only supported for bfloat16"):
        nvfp4.quantize(torch.ones(4, 16), rht=True, name="fc1 input")


# ---- against the independent reference --------------------------------------------------------------------------


def _wide_range(shape, seed, dtype=torch.float32) -> torch.Tensor:
    """Gaussian values times a log-normal per-element magnitude: blocks with subnormal and saturated scales."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(3.0 * torch.randn(shape, generator=g))
    x[..., ::7] = 0.0
    return x.clamp(-6e4, 6e4).to(dtype)  # finite in float16


@pytest.mark.parametrize(
    ("shape", "tile", "dtype"),
    [
        ((1, 1), (1, 16), torch.float32),
        ((3, 17), (1, 16), torch.float32),
        ((5, 40), (1, 16), torch.bfloat16),
        ((2, 3, 20), (1, 16), torch.float16),
        ((7, 64), (1, 16), torch.float32),
        ((20, 40), (16, 16), torch.float32),
        ((33, 17), (16, 16), torch.bfloat16),
    ],
)
def test_matches_naive_reference(shape, tile, dtype):
    x = _wide_range(shape, seed=sum(shape), dtype=dtype)
    q = nvfp4.quantize(x, tile=tile)
    x2d = x.reshape(-1, shape[-1]).float().numpy()
    codes, scales, amax = reference_quantize(x2d, tile)
    assert q.amax.item() == amax
    assert q.scales.numpy().tolist() == scales.tolist()
    assert nvfp4.unpack_codes(q).numpy().tolist() == codes.tolist()
    assert q.codes.shape == (x2d.shape[0], math.ceil(shape[-1] / 16) * 8)
    dq = nvfp4.dequantize(q)
    assert dq.shape == x.shape
    expected = reference_dequantize(codes, scales, amax)
    assert np.array_equal(dq.reshape(x2d.shape).numpy().view(np.uint32), expected.view(np.uint32))


def test_padding_is_zero_and_does_not_change_the_blocks():
    x = _wide_range((4, 20), seed=3)
    q = nvfp4.quantize(x)
    padded = torch.nn.functional.pad(x, (0, 12))
    qp = nvfp4.quantize(padded)
    assert torch.equal(q.codes, qp.codes) and torch.equal(q.scales, qp.scales)
    assert nvfp4.unpack_codes(q, padded=True)[:, 20:].eq(0).all()


@pytest.mark.parametrize("shape", [(48, 80), (40, 24), (17, 33)])
def test_2d_columnwise_codes_are_the_transpose_of_rowwise(shape):
    w = _wide_range(shape, seed=shape[0])
    rowwise = nvfp4.quantize(w, tile=(16, 16))
    colwise = nvfp4.quantize(w.t(), tile=(16, 16))
    assert torch.equal(nvfp4.unpack_codes(rowwise), nvfp4.unpack_codes(colwise).t())
    tiles_r = rowwise.scales[::16]  # [ceil(M/16), ceil(K/16)]
    tiles_c = colwise.scales[::16]
    assert torch.equal(tiles_r, tiles_c.t())
    assert torch.equal(nvfp4.dequantize(rowwise), nvfp4.dequantize(colwise).t())


def test_float64_input_is_rounded_to_float32_first():
    x = _wide_range((4, 32), seed=9).double() * (1 + 1e-12)
    q64, q32 = nvfp4.quantize(x), nvfp4.quantize(x.float())
    assert torch.equal(q64.codes, q32.codes) and torch.equal(q64.scales, q32.scales)
    assert nvfp4.fake_quantize(x).dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fake_quantize_is_dequantize_of_quantize(dtype):
    x = torch.randn(6, 5, 48, generator=torch.Generator().manual_seed(1)).to(dtype)
    for tile in nvfp4.TILES:
        fq = nvfp4.fake_quantize(x, tile=tile)
        assert fq.dtype == dtype and fq.shape == x.shape
        assert torch.equal(fq, nvfp4.dequantize(nvfp4.quantize(x, tile=tile), dtype=dtype))


def test_record_of_the_quantized_tensor():
    x = torch.randn(2, 3, 40, dtype=torch.bfloat16)
    q = nvfp4.quantize(x, tile=[16, 16])
    assert (q.shape, q.dtype, q.tile, q.rht, q.stochastic) == (x.shape, torch.bfloat16, (16, 16), False, False)
    assert q.codes.dtype == torch.uint8 and q.scales.dtype == torch.uint8 and q.amax.dim() == 0
    assert nvfp4.unpack_codes(q).shape == (6, 40)


# ---- GEMM helpers (SPEC 1.8) -------------------------------------------------------------------------------------


def test_scaled_codes_are_exact_in_bf16_and_fp16():
    q = nvfp4.quantize(_wide_range((32, 48), seed=5))
    exact = nvfp4.scaled_codes(q, torch.float32)
    assert torch.equal(nvfp4.scaled_codes(q, torch.bfloat16).float(), exact)
    assert torch.equal(nvfp4.scaled_codes(q, torch.float16).float(), exact)
    values = nvfp4.e2m1_values(nvfp4.unpack_codes(q))
    assert torch.equal(exact, values * nvfp4.scale_values(q).repeat_interleave(16, dim=1)[:, :48])


def test_gemm_alpha_and_scaled_code_gemm_reproduce_the_decoded_product():
    g = torch.Generator().manual_seed(11)
    a, b = torch.randn(24, 64, generator=g) * 3, torch.randn(40, 64, generator=g) * 0.01
    qa, qb = nvfp4.quantize(a), nvfp4.quantize(b, tile=(16, 16))
    alpha = nvfp4.gemm_alpha(qa.amax, qb.amax)
    expected = F32(F32(F32(qa.amax.item()) * F32(qb.amax.item())) * F32(nvfp4.INV_GEMM))
    assert alpha.dtype == torch.float32 and bits(alpha.item()) == bits(expected)
    sa, sb = nvfp4.scaled_codes(qa, torch.float64), nvfp4.scaled_codes(qb, torch.float64)
    emulated = (sa @ sb.t()) * alpha.item()
    decoded = nvfp4.dequantize(qa, torch.float64) @ nvfp4.dequantize(qb, torch.float64).t()
    magnitude = (sa.abs() @ sb.abs().t()) * alpha.item()  # the decoded factors differ by a few float32 ulps
    assert ((emulated - decoded).abs() <= 1e-6 * magnitude).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_byte_for_byte():
    x = _wide_range((256, 272), seed=2)
    for tile in nvfp4.TILES:
        cpu, gpu = nvfp4.quantize(x, tile=tile), nvfp4.quantize(x.cuda(), tile=tile)
        assert torch.equal(cpu.codes, gpu.codes.cpu()) and torch.equal(cpu.scales, gpu.scales.cpu())
        assert torch.equal(nvfp4.dequantize(cpu), nvfp4.dequantize(gpu).cpu())
    xb = x.bfloat16()
    assert torch.equal(nvfp4.fake_quantize(xb, rht=True), nvfp4.fake_quantize(xb.cuda(), rht=True).cpu())
