"""The format registry: every entry round-trips through its module with the same API."""

import pytest
import torch

from quant import formats
from quant.errors import QuantError


def test_registry_names():
    assert list(formats.FORMATS) == ["nvfp4", "mxfp4", "nf4", "int4", "fp8_e4m3", "fp8_e5m2"]
    with pytest.raises(QuantError, match="valid formats: nvfp4, mxfp4, nf4, int4, fp8_e4m3, fp8_e5m2"):
        formats.get("fp4")


@pytest.mark.parametrize("name", list(formats.FORMATS))
def test_same_api_for_every_format(name):
    fmt = formats.get(name)
    x = torch.randn(4, 3, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    q = fmt.quantize(x, name="probe")
    dq = fmt.dequantize(q, dtype=torch.bfloat16)
    assert dq.shape == x.shape and dq.dtype == torch.bfloat16
    assert torch.equal(fmt.fake_quantize(x), dq)
    err = (dq.double() - x.double()).pow(2).mean() / x.double().pow(2).mean()
    assert 0 < err < 0.02  # every format loses something, none loses much on Gaussian data
    assert fmt.bits_per_element >= 4


def test_fixed_options_are_applied():
    x = torch.randn(64)
    assert formats.get("fp8_e5m2").quantize(x).fmt == "e5m2"
    assert formats.get("nvfp4").quantize(x.bfloat16(), rht=True).rht
