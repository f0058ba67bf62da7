"""MXFP4 (OCP MX) against SPEC T7 and an independent per-block float64 reference."""

import math

import numpy as np
import pytest
import torch

from quant import mxfp4
from quant.errors import QuantError

E2M1_GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def _t7() -> torch.Tensor:
    x = torch.zeros(3, 32)
    x[0, :4] = torch.tensor([5.0, -1.3, 0.2, 2.6])
    x[1, :4] = torch.tensor([7.0, 3.3, -0.9, 0.1])
    x[2, :4] = torch.tensor([0.3, -0.07, 0.15, 0.01])
    return x


def test_t7_floor():
    q = mxfp4.quantize(_t7())
    assert q.scales.flatten().tolist() == [0x7F, 0x7F, 0x7B]
    assert mxfp4.unpack_codes(q)[:, :4].tolist() == [[6, 0xB, 0, 5], [7, 5, 0xA, 0], [6, 0xA, 4, 0]]
    assert mxfp4.dequantize(q)[:, :4].tolist() == [[4, -1.5, 0, 3], [6, 3, -1, 0], [0.25, -0.0625, 0.125, 0]]


def test_t7_rceil_does_not_clip_the_block_max():
    q = mxfp4.quantize(_t7(), scale_rule="rceil")
    assert q.scales.flatten().tolist() == [0x7F, 0x80, 0x7B]
    assert mxfp4.dequantize(q)[1, :4].tolist() == [8, 3, -1, 0]


def _nearest_even(value: float) -> int:
    a = abs(value)
    if a >= 6:
        return 7
    return min(range(8), key=lambda i: (abs(E2M1_GRID[i] - a), i % 2))


def reference(x: np.ndarray, rule: str) -> tuple[list[list[int]], list[list[int]]]:
    """Per block: exponent from math.frexp (exact), elements scaled in float64 (exact), nearest-even E2M1."""
    codes, scales = [], []
    for row in x.astype(np.float64):
        padded = np.concatenate([row, np.zeros((-len(row)) % 32)])
        row_codes, row_scales = [], []
        for block in padded.reshape(-1, 32):
            amax = float(np.abs(block).max())
            if amax == 0:
                e = -127
            elif rule == "floor":
                e = math.frexp(amax)[1] - 1 - 2
            else:
                descale = float(np.float32(amax) / np.float32(6))
                e = math.ceil(math.log2(descale))  # then fix any log2 rounding: the least e with 2^e >= descale
                while 2.0**e < descale:
                    e += 1
                while 2.0 ** (e - 1) >= descale:
                    e -= 1
            e = max(-127, min(127, e))
            row_scales.append(e + 127)
            row_codes += [_nearest_even(v / 2.0**e) | (8 if v / 2.0**e < 0 else 0) for v in block]
        codes.append(row_codes[: len(row)])
        scales.append(row_scales)
    return codes, scales


@pytest.mark.parametrize("rule", mxfp4.SCALE_RULES)
@pytest.mark.parametrize("shape", [(4, 32), (3, 50), (2, 5, 70)])
def test_matches_reference(rule, shape):
    g = torch.Generator().manual_seed(len(shape) + shape[-1])
    x = torch.randn(shape, generator=g) * torch.exp(4 * torch.randn(shape, generator=g))
    x[..., 40:] = 0  # an all-zero block where K > 64
    q = mxfp4.quantize(x, scale_rule=rule)
    codes, scales = reference(x.reshape(-1, shape[-1]).numpy(), rule)
    assert q.scales.tolist() == scales
    assert mxfp4.unpack_codes(q).tolist() == codes
    dq = mxfp4.dequantize(q)
    assert dq.shape == x.shape and torch.equal(dq, mxfp4.fake_quantize(x, scale_rule=rule))


def test_floor_maps_block_max_into_4_to_8_and_rceil_never_clips():
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)) * 10
    blocks = x.view(64, 4, 32)
    amax = blocks.abs().amax(-1)
    floor_max = amax.double() / 2.0 ** (mxfp4.quantize(x, scale_rule="floor").scales.double() - 127)
    assert ((floor_max >= 4) & (floor_max < 8)).all() and (floor_max > 6).any()  # some blocks clip
    rceil_max = amax.double() / 2.0 ** (mxfp4.quantize(x, scale_rule="rceil").scales.double() - 127)
    assert ((rceil_max > 3) & (rceil_max <= 6)).all()


def test_all_zero_and_subnormal_blocks():
    x = torch.zeros(2, 32)
    x[1, 0] = 1e-40  # float32 subnormal: the exponent clamps to -127
    q = mxfp4.quantize(x)
    assert q.scales.flatten().tolist() == [0x00, 0x00]
    assert mxfp4.dequantize(q)[0].eq(0).all()


def test_errors_name_the_tensor_and_choices():
    with pytest.raises(QuantError, match=r"valid: \('floor', 'rceil'\)"):
        mxfp4.quantize(torch.ones(2, 32), scale_rule="ceil")
    x = torch.ones(2, 32)
    x[1, 3] = float("nan")
    with pytest.raises(QuantError, match="'blocks.0.attn.q_proj weight' contains 1 NaN"):
        mxfp4.quantize(x, name="blocks.0.attn.q_proj weight")
