"""NVFP4 stochastic rounding (SPEC 1.7, T6): statistics, unbiasedness versus RN, reproducibility."""

import math

import torch

from quant import nvfp4


def _t6_tensor(n: int) -> torch.Tensor:
    """Rows of one block whose max (6) fixes S_enc = 448 and e = 1, so 2.3 is scaled to 2.29999995 unchanged."""
    x = torch.full((n, 16), 2.3)
    x[:, 0] = 6.0
    return x


def test_t6_probability_of_rounding_up():
    n = 4096
    q = nvfp4.quantize(_t6_tensor(n), stochastic=True, generator=torch.Generator().manual_seed(0))
    assert q.stochastic and q.scales.eq(0x7E).all()
    codes = nvfp4.unpack_codes(q)[:, 1:]
    assert ((codes == 4) | (codes == 5)).all()  # only the two neighbours 2 and 3
    p_hat = (codes == 5).double().mean().item()
    p = 76 / 256
    assert abs(p_hat - p) <= 4 * math.sqrt(p * (1 - p) / codes.numel())


def test_sr_mean_beats_round_to_nearest():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 128, generator=g)
    rn = nvfp4.fake_quantize(x).double()
    sr_mean = torch.stack([nvfp4.fake_quantize(x, stochastic=True, generator=g).double() for _ in range(50)]).mean(0)
    rmse = lambda y: (y - x.double()).pow(2).mean().sqrt().item()  # noqa: E731
    assert rmse(sr_mean) < 0.5 * rmse(rn)


def test_sr_is_reproducible_from_the_generator_and_keeps_the_scales():
    x = torch.randn(32, 80, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    a = nvfp4.quantize(x, stochastic=True, generator=torch.Generator().manual_seed(5))
    b = nvfp4.quantize(x, stochastic=True, generator=torch.Generator().manual_seed(5))
    c = nvfp4.quantize(x, stochastic=True, generator=torch.Generator().manual_seed(6))
    rn = nvfp4.quantize(x)
    assert torch.equal(a.codes, b.codes) and not torch.equal(a.codes, c.codes)
    assert torch.equal(a.scales, rn.scales) and torch.equal(a.amax, rn.amax)  # SR changes only the element rounding
    assert nvfp4.unpack_codes(a, padded=True)[:, 80:].eq(0).all()  # zero padding never rounds up


def test_sr_with_rht_on_bf16():
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    y = nvfp4.fake_quantize(x, rht=True, stochastic=True, generator=torch.Generator().manual_seed(0))
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    rn = nvfp4.fake_quantize(x, rht=True)
    step = nvfp4.dequantize(nvfp4.quantize(x, rht=True)).abs().max() / 3  # at most one grid step (<= 2 of 6) apart
    assert (y.float() - rn.float()).abs().max() <= step
