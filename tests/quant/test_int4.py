"""Symmetric per-block INT4: hand-computed vector, symmetry, and a float32 numpy reference."""

import numpy as np
import pytest
import torch

from quant import int4
from quant.errors import QuantError


def test_hand_vector_round_half_even_and_clamp():
    x = torch.zeros(1, 32)
    x[0, :9] = torch.tensor([7.0, -3.5, 1.75, 0.5, -7.0, 2.5, -2.5, 1.5, 6.9])
    q = int4.quantize(x)
    assert q.scales.tolist() == [[1.0]]
    assert int4.unpack_ints(q)[0, :9].tolist() == [7, -4, 2, 0, -7, 2, -2, 2, 7]
    assert q.codes[0, :2].tolist() == [0x7 | 0xC << 4, 0x2 | 0x0 << 4]  # two's complement nibbles, low first
    assert int4.dequantize(q)[0, :9].tolist() == [7, -4, 2, 0, -7, 2, -2, 2, 7]


def reference(x: np.ndarray, blocksize: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 numpy: scale = absmax / 7, ints = clip(rint(x / scale), -7, 7) per block of the last dim."""
    m, k = x.shape
    kp = -(-k // blocksize) * blocksize
    padded = np.zeros((m, kp), dtype=np.float32)
    padded[:, :k] = x
    blocks = padded.reshape(m, -1, blocksize)
    scales = np.abs(blocks).max(-1) / np.float32(7)
    with np.errstate(all="ignore"):
        ints = np.where(scales[..., None] > 0, np.clip(np.rint(blocks / scales[..., None]), -7, 7), 0)
    return ints.reshape(m, kp)[:, :k].astype(np.int8), scales


@pytest.mark.parametrize(("shape", "blocksize"), [((8, 64), 32), ((3, 50), 16), ((2, 4, 130), 128)])
def test_matches_reference(shape, blocksize):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(shape[-1])) * 5
    x[..., :blocksize] = 0.0  # all-zero blocks
    q = int4.quantize(x, blocksize=blocksize)
    ints, scales = reference(x.reshape(-1, shape[-1]).numpy(), blocksize)
    assert np.array_equal(int4.unpack_ints(q).numpy(), ints)
    assert np.array_equal(q.scales.numpy(), scales)
    dq = int4.dequantize(q)
    assert dq.shape == x.shape and torch.equal(dq, int4.fake_quantize(x, blocksize=blocksize))


def test_symmetric_range_and_error_bound():
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    q, q_neg = int4.quantize(x), int4.quantize(-x)
    ints = int4.unpack_ints(q)
    assert torch.equal(int4.unpack_ints(q_neg), -ints)
    assert ints.min().item() == -7 and ints.max().item() == 7
    err = (int4.dequantize(q) - x).abs().view(64, 8, 32).amax(-1)
    assert (err <= q.scales / 2 * (1 + 1e-6)).all()


def test_errors():
    with pytest.raises(QuantError, match=r"valid: \(16, 32, 64, 128, 256\)"):
        int4.quantize(torch.ones(2, 32), blocksize=24)
    with pytest.raises(QuantError, match="'fc.weight' contains 1 NaN"):
        int4.quantize(torch.tensor([[1.0, float("nan")]]), name="fc.weight")
