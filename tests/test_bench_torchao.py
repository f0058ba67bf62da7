"""The torchao peer row of bench/train_step.py: which layers it swaps, what its backward is, and how close torchao's
NVFP4 quantizer is to ours (a peer library, so agreement is measured, not assumed; SPEC_NVFP4.md lists torchao as a
variant of TE's scale rule)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from quant import nvfp4

pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")
warnings.filterwarnings("ignore", message=".*register_constant.*")

from bench import torchao_nvfp4, train_step  # noqa: E402  (after the importorskip)


def test_swaps_exactly_the_layers_our_policy_quantizes_and_keeps_the_state_dict():
    work = train_step.workloads(quick=True)["decoder"]
    reference, ours, _ = train_step.build(work, "nvfp4-dequantized", torch.device("cpu"))
    model, swapped, _ = train_step.build(work, torchao_nvfp4.MODE, torch.device("cpu"))
    assert swapped == ours and len(swapped) > 0
    modules = dict(model.named_modules())
    assert all(type(modules[name]) is torchao_nvfp4.TorchaoNVFP4Linear for name in swapped)
    assert model.state_dict().keys() == reference.state_dict().keys()
    loss = train_step.make_step(model, work, torch.device("cpu"))()
    assert torch.isfinite(loss)


def test_backward_uses_the_dequantized_operands():
    """dX = dY @ W_q and dW = dY^T @ X_q with torchao's quantized operands (TE's backward_override="dequantized")."""
    torch.manual_seed(0)
    layer = torchao_nvfp4.TorchaoNVFP4Linear(64, 32, bias=False)
    x = torch.randn(8, 64, requires_grad=True)
    grad_out = torch.randn(8, 32)
    layer(x).backward(grad_out)
    x_q = torchao_nvfp4._TorchaoFakeQuantize.apply(x.detach())
    w_q = torchao_nvfp4._TorchaoFakeQuantize.apply(layer.weight.detach())
    assert not torch.equal(x_q, x.detach())  # the quantizer does act
    torch.testing.assert_close(layer(x).detach(), F.linear(x_q, w_q), rtol=0, atol=0)
    torch.testing.assert_close(x.grad, grad_out @ w_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.weight.grad, grad_out.t() @ x_q, rtol=1e-6, atol=1e-6)


def test_a_model_whose_policy_quantizes_convolutions_is_refused_by_name():
    work = train_step.workloads(quick=True)["unet"]
    with pytest.raises(ValueError, match=r"Linear layers only .* quantizes Conv"):
        train_step.build(work, torchao_nvfp4.MODE, torch.device("cpu"))


def test_torchao_and_our_nvfp4_agree_on_almost_every_bf16_value():
    """Same format, two implementations: on BF16 data with rows of different scale, 1x16 blocks, the values agree
    except for a few elements near rounding boundaries, and the quantization errors are the same to 0.1%."""
    torch.manual_seed(0)
    x = (torch.randn(256, 512) * torch.rand(256, 1) * 4).to(torch.bfloat16)
    ours = nvfp4.fake_quantize(x, tile=(1, 16))
    theirs = torchao_nvfp4._TorchaoFakeQuantize.apply(x)
    assert (ours == theirs).float().mean() > 0.995
    error = [((q.double() - x.double()).norm() / x.double().norm()).item() for q in (ours, theirs)]
    assert error[0] == pytest.approx(error[1], rel=1e-3)
