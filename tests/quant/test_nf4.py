"""NF4 against SPEC T7, the normal-quantile construction of the codebook (scipy), and bitsandbytes when installed."""

import numpy as np
import pytest
import torch
from scipy.stats import norm

from quant import nf4
from quant.errors import QuantError

T7_X = [2.0, 0.16, -1.0, 0.0, 0.5, -0.3, 1.3, 0.08]


def test_t7_codes_packing_and_values():
    x = torch.zeros(64)
    x[:8] = torch.tensor(T7_X)
    q = nf4.quantize(x)
    assert q.absmax.tolist() == [2.0] and q.blocksize == 64
    assert nf4.unpack_codes(q)[:8].tolist() == [15, 8, 2, 7, 10, 5, 14, 8]
    assert q.codes[:4].tolist() == [0xF8, 0x27, 0xA5, 0xE8]  # first element in the high nibble
    dq = nf4.dequantize(q)[:8]
    assert dq.tolist() == [float(np.float32(nf4.CODEBOOK[c]) * np.float32(2)) for c in (15, 8, 2, 7, 10, 5, 14, 8)]
    expected = [2, 0.1591606, -1.0501461, 0, 0.4922246, -0.3695469, 1.4459137, 0.1591606]
    assert dq.tolist() == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_codebook_is_bitsandbytes_normal_map():
    """create_normal_map(offset=0.9677083, use_extra_value=True): 8 positive and 7 negative N(0,1) quantiles and 0.

    As bitsandbytes computes it: float32 quantile levels, float64 ppf, float32 values normalised in float32."""
    offset = 0.9677083
    positive = norm.ppf(torch.linspace(offset, 0.5, 9)[:-1].double().numpy())
    negative = -norm.ppf(torch.linspace(offset, 0.5, 8)[:-1].double().numpy())
    values = np.sort(np.concatenate([positive, [0.0], negative])).astype(np.float32)  # then normalised in float32
    assert np.array_equal(np.array(nf4.CODEBOOK, dtype=np.float32), values / values.max())


def test_thresholds_are_float32_midpoints_and_ties_go_down():
    codebook = torch.tensor(nf4.CODEBOOK)
    assert torch.equal(torch.tensor(nf4.THRESHOLDS), (codebook[1:] + codebook[:-1]) / 2)
    for i, t in enumerate(nf4.THRESHOLDS):
        t32 = torch.tensor(t, dtype=torch.float32)
        up = torch.nextafter(t32, torch.tensor(2.0))
        down = torch.nextafter(t32, torch.tensor(-2.0))
        x = torch.tensor([1.0, t32, up, down, -1.0] + [0.0] * 59)  # absmax 1: normalisation is exact
        assert nf4.unpack_codes(nf4.quantize(x))[1:4].tolist() == [i, i + 1, i]


def test_zero_block_partial_block_and_odd_length():
    x = torch.randn(3 * 64 + 7, generator=torch.Generator().manual_seed(0))
    x[64:128] = 0.0
    q = nf4.quantize(x)
    assert q.absmax.shape == (4,) and q.absmax[1].item() == 0.0
    codes = nf4.unpack_codes(q)
    assert codes[64:128].eq(7).all()  # the zero code, decodes to 0
    assert q.codes.numel() == (x.numel() + 1) // 2 and (q.codes[-1] & 0x0F).item() == 7  # padding nibble is 0.0
    dq = nf4.dequantize(q)
    assert dq[64:128].eq(0).all()
    assert q.absmax[3].item() == x[192:].abs().max().item()  # the partial block's own absmax


def test_error_bounds_and_double_quantization():
    x = torch.randn(128, 256, generator=torch.Generator().manual_seed(1))
    q = nf4.quantize(x)
    dq = nf4.dequantize(q)
    max_gap = max(b - a for a, b in zip(nf4.CODEBOOK, nf4.CODEBOOK[1:]))
    blocks_err = (dq - x).view(-1, 64).abs().amax(1)
    assert (blocks_err <= q.absmax * max_gap / 2 * (1 + 1e-6)).all()
    qd = nf4.quantize(x, double_quant=True)
    assert qd.double_quant and qd.absmax is None
    assert torch.equal(nf4.unpack_codes(qd), nf4.unpack_codes(q))  # the 4-bit codes use the exact absmax
    absmax_err = (qd.block_absmax() - q.absmax).abs().max()
    assert absmax_err <= qd.absmax_scales.max() * 0.02 and absmax_err > 0
    assert qd.absmax_offset.item() == pytest.approx(q.absmax.mean().item())


def test_dynamic_map_shape():
    m = nf4.dynamic_map()
    assert m.shape == (256,) and m[-1].item() == 1.0 and (m == 0).sum().item() == 1
    assert torch.equal(m, m.sort().values) and m[0].item() == pytest.approx(-0.99297, abs=1e-5)


def test_errors():
    with pytest.raises(QuantError, match="valid: \\(32, 64"):
        nf4.quantize(torch.ones(64), blocksize=48)
    x = torch.ones(64)
    x[0] = float("inf")
    with pytest.raises(QuantError, match="'lm_head weight' contains 0 NaN and 1 Inf"):
        nf4.quantize(x, name="lm_head weight")


# ---- peer: bitsandbytes itself (CPU backend), optional ---------------------------------------------------------------


@pytest.mark.parametrize(("shape", "blocksize"), [((64, 128), 64), ((37, 53), 64), ((64, 300), 128), ((1001,), 32)])
def test_matches_bitsandbytes(shape, blocksize):
    functional = pytest.importorskip("bitsandbytes.functional")
    g = torch.Generator().manual_seed(shape[0])
    x = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g))
    x.view(-1)[:blocksize] = 0.0  # an all-zero block
    packed, state = functional.quantize_4bit(x, blocksize=blocksize, quant_type="nf4")
    q = nf4.quantize(x, blocksize=blocksize)
    theirs = packed.flatten()
    assert torch.equal(q.absmax, state.absmax)
    assert torch.equal(q.codes, theirs)
    assert torch.equal(nf4.dequantize(q).flatten(), functional.dequantize_4bit(packed, state).flatten())


@pytest.mark.parametrize(("shape", "blocksize"), [((64, 128), 64), ((300, 300), 64)])
def test_double_quantization_matches_bitsandbytes(shape, blocksize):
    functional = pytest.importorskip("bitsandbytes.functional")
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4)) * 3
    packed, state = functional.quantize_4bit(x, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
    q = nf4.quantize(x, blocksize=blocksize, double_quant=True)
    assert torch.equal(q.codes, packed.flatten())
    assert q.absmax_offset.item() == state.offset.item()
    assert torch.equal(q.absmax_scales, state.state2.absmax)
    # bitsandbytes' CPU table search sometimes returns the second-nearest 8-bit code; ours must be the nearest.
    theirs = state.absmax.flatten()
    differ = (q.absmax_codes != theirs).nonzero().flatten()
    assert differ.numel() <= max(2, theirs.numel() // 50)
    centred = nf4.quantize(x, blocksize=blocksize).absmax - q.absmax_offset
    normalised = centred / q.absmax_scales.repeat_interleave(256)[: centred.numel()]
    table = nf4.dynamic_map()
    ours_gap = (normalised - table[q.absmax_codes.long()]).abs()
    their_gap = (normalised - table[theirs.long()]).abs()
    assert (ours_gap <= their_gap).all()
    assert ((q.absmax_codes.int() - theirs.int()).abs() <= 1).all()
