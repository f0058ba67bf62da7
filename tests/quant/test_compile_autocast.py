"""Compiled QAT blocks under autocast: every backward mode traces with the autocast state it runs with.

The failure this guards (issue 6, seen on the H100 as Dynamo's "Global autocast(cuda)_enabled state changed while
dynamo tracing"): the layers' backward leaves autocast (``quant.functional._autocast_off``) and, before the fix, read
a gradient's strides inside that block (the GEMM epilogue's layout check in ``quant.gemm.finish``). Dynamo speculates
the backward while tracing the forward; the stride read made it abandon that trace and retrace, without ever leaving
the abandoned ``autocast(enabled=False)``. Every layer traced after it in the frame saw autocast off, so a layer whose
input is float32 (q/k/v reading one normalised activation, two convolutions reading one input) got a float32 compute
dtype: ``backward=full`` refused it inside the trace (the NVFP4 wgrad RHT needs BF16), ``dequantized`` and
``high_precision`` blocks with a bias compiled a float32 layer where eager computes in BF16.

The layers only compile without graph breaks on the kernel path (the reference path's NaN check is data-dependent),
so the cases run as ``test_kernels`` runs its interpreter cases: in a subprocess with ``TRITON_INTERPRET=1`` and the
CUDA implementation of ``quant.gemm`` / ``quant.functional`` switched onto CPU tensors (``fast_path_on_cpu``). With
the ``aot_eager`` backend compiled and eager results are bit-identical, SR included (same Philox counters).

A second failure of issue 6 (H100, torch 2.11: ``bench.train_step --models unet --compile blocks`` skipped its NVFP4
rows with an AssertionError in Dynamo's ``overwrite_tensor_vt_proxy`` while tracing ``_QuantConvFunction.apply``):
torch 2.11 compiles each ``ConvNormAct.forward`` of a UNet block as its own frame, so the block's second conv
recompiles that frame with the channel dim dynamic (automatic dynamic shapes). The convolution inside the Function's
forward then specialized the symbol to the weight's Cin in mid-trace; sizes derived from it, which the forward hands
on as subgraph outputs, were traced as SymInts but came back as constants when Dynamo replayed the forward on fake
tensors. ``quant.functional._check_reduction_size`` now specializes the reduction dim before the Function. torch
2.14.1 returns a Function's forward intermediates from the subgraph only when the forward has a side effect (torch
2.11: always), so the CPU case compiles with ``dynamic=True`` and lets the trace import the kernel ops (a side effect,
as in the first quantized call of a process); it fails without the fix for linear (K) and convolution (Ci) blocks.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.quant.test_kernels import HAS_TRITON, IN_INTERPRETER, assert_same_bits, run_interpreter_tests
from tests.quant.test_kernels import fast_path_on_cpu  # noqa: F401  (fixture)

interp = pytest.mark.skipif(not IN_INTERPRETER, reason="runs inside the Triton-interpreter subprocess")


@pytest.mark.skipif(IN_INTERPRETER or not HAS_TRITON, reason="needs triton; this is the parent run")
def test_compiled_blocks_under_autocast_in_the_interpreter():
    run_interpreter_tests(str(Path(__file__)), timeout_s=300)


class _Projections(nn.Module):
    """Three projections of one float32 input, as a decoder block's q/k/v read the normalised activation."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(32, 32) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, T, 32] float32
        return x + self.o(self.q(x) * self.k(x) + self.v(x))


class _ConvBranches(nn.Module):
    """Two convolutions of one float32 input, then a transposed convolution and a strided one back to its size."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 1)
        self.up, self.down = nn.ConvTranspose2d(16, 16, 2, stride=2), nn.Conv2d(16, 16, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [N, 16, H, W] float32
        return x + self.down(self.up(self.a(x) * self.b(x)))


BLOCKS = {"linear": (_Projections, (2, 8, 32)), "conv": (_ConvBranches, (2, 16, 4, 4))}


def _quantized_block(make, shape: tuple[int, ...], backward: str) -> tuple[nn.Module, torch.Tensor, list]:
    """A fresh NVFP4 block (seed 0) with primed SR states, its input, and the SR states to replay for the second step.
    Resets Dynamo so every case traces from scratch."""
    import quant

    torch._dynamo.reset()
    torch.manual_seed(0)
    block = make()
    quant.apply(block, quant.Policy(format="nvfp4", recipe=quant.Recipe(backward=backward)))
    x = torch.randn(shape)
    for layer in quant.quantized_modules(block).values():
        layer.quantizer.prime(x.device)
    return block, x, quant.sr_states(block)


def _step(block: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Output, input gradient and parameter gradients of one BF16-autocast step."""
    block.zero_grad()
    x = x.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(x)
    y.float().square().mean().backward()
    return [y.detach(), x.grad] + [p.grad.clone() for p in block.parameters()]


# Every mode reaches the epilogue in its backward (the bias gradient at least); high_precision convolutions take the
# same backward calls as dequantized ones.
CASES = [("full", "linear"), ("dequantized", "linear"), ("high_precision", "linear"), ("full", "conv"),
         ("dequantized", "conv")]


@interp
@pytest.mark.parametrize("backward, kind", CASES)
def test_interp_compiled_block_under_autocast_equals_eager(backward, kind, fast_path_on_cpu):  # noqa: F811
    import quant

    fast_path_on_cpu()
    block, x, states = _quantized_block(*BLOCKS[kind], backward)
    eager = _step(block, x)
    quant.load_sr_states(block, states)  # the compiled step draws the same SR bits
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break is an error
    got = _step(compiled, x)
    assert torch.is_autocast_enabled("cpu") is False
    names = ["output", "input gradient"] + [f"{name} gradient" for name, _ in block.named_parameters()]
    for name, actual, expected in zip(names, got, eager, strict=True):
        assert_same_bits(actual, expected, f"{kind} {backward}: compiled vs eager {name}")


@interp
def test_interp_autocast_entered_inside_the_compiled_function(fast_path_on_cpu):  # noqa: F811
    """Autocast entered inside the compiled function (test_kernels' GPU case): before the fix the abandoned backward
    trace's autocast(enabled=False) was exited after the outer autocast, leaving autocast on after tracing (Dynamo's
    "Global autocast(cpu)_enabled state changed while dynamo tracing")."""
    import quant

    fast_path_on_cpu()
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    quant.apply(model, quant.Policy(format="nvfp4", recipe=quant.Recipe(backward="full")))
    x = torch.randn(4, 16, 32, requires_grad=True)

    def loss(inp: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(inp).float().square().mean()

    for layer in quant.quantized_modules(model).values():
        layer.quantizer.prime(x.device)
    states = quant.sr_states(model)
    eager = torch.autograd.grad(loss(x), [x, *model.parameters()])
    quant.load_sr_states(model, states)
    got = torch.autograd.grad(torch.compile(loss, backend="aot_eager", fullgraph=True)(x), [x, *model.parameters()])
    assert torch.is_autocast_enabled("cpu") is False
    for i, (actual, expected) in enumerate(zip(got, eager, strict=True)):
        assert_same_bits(actual, expected, f"compiled vs eager gradient {i}")


def _unet_down_block() -> nn.Module:
    """The UNet's down block: max-pool, then two ConvNormAct (3x3 conv without bias, GroupNorm, in-place ReLU)."""
    from models.unet import Down

    return Down(16, 32, groups=8)


DYNAMIC_BLOCKS = {"unet-down": (_unet_down_block, (2, 16, 8, 8)), "linear": BLOCKS["linear"]}
# high_precision convolutions take the same forward and backward calls as dequantized ones
DYNAMIC_CASES = [("full", "unet-down"), ("dequantized", "unet-down"), ("full", "linear")]


@interp
@pytest.mark.parametrize("backward, kind", DYNAMIC_CASES)
def test_interp_compiled_block_with_dynamic_reduction_dim_equals_eager(backward, kind, fast_path_on_cpu,  # noqa: F811
                                                                      monkeypatch):
    """A block whose input sizes Dynamo traces as symbols, reduction dim (Ci, K) included: it compiles with
    fullgraph (before the fix: AssertionError in ``overwrite_tensor_vt_proxy``) and equals eager bit for bit."""
    import quant
    from quant import kernels

    fast_path_on_cpu()
    block, x, states = _quantized_block(*DYNAMIC_BLOCKS[kind], backward)
    monkeypatch.setattr(kernels, "_ops", None)  # unprimed: the compiled call below imports the kernel ops in its trace
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True, dynamic=True)
    got = _step(compiled, x)  # compiled first: nothing has loaded the kernel ops before the trace
    quant.load_sr_states(block, states)  # the eager step draws the same SR bits
    eager = _step(block, x)
    names = ["output", "input gradient"] + [f"{name} gradient" for name, _ in block.named_parameters()]
    for name, actual, expected in zip(names, got, eager, strict=True):
        assert_same_bits(actual, expected, f"{kind} {backward} (dynamic shapes): compiled vs eager {name}")


@pytest.mark.parametrize("kind", ["linear", "conv2d", "conv_transpose2d"])
def test_input_that_does_not_fit_the_weight_is_refused_naming_the_layer(kind):
    """The reduction-size check that specializes Ci / K before the Function is also the input check of eager calls."""
    import quant
    from quant.errors import QuantError

    layers = {"linear": (nn.Linear(32, 16), (2, 48), "K = 32"),
              "conv2d": (nn.Conv2d(16, 32, 3), (1, 32, 6, 6), "Ci = 16"),
              "conv_transpose2d": (nn.ConvTranspose2d(32, 16, 2, stride=2), (1, 16, 4, 4), "Ci = 32")}
    layer, shape, expected = layers[kind]
    model = nn.Sequential(layer)
    quant.apply(model, quant.Policy(format="nvfp4", recipe=quant.Recipe(backward="dequantized")))
    with pytest.raises(QuantError, match=rf"^0: input of shape {re.escape(str(shape))} does not fit the weight: .*"
                                         rf"{expected}$"):
        model(torch.randn(shape))


def _count_quantizations(block: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(forward, backward) counts of quantize operations in the AOTAutograd graphs of one compiled BF16-autocast step,
    partitioned as Inductor partitions (``min_cut_rematerialization_partition``, which runs the graph CSE pass)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    counts = []

    def count(gm: torch.fx.GraphModule, example_inputs: list) -> torch.fx.GraphModule:
        counts.append(sum(1 for node in gm.graph.nodes if node.op == "call_function"
                          and str(node.target).startswith("fp4lab.nvfp4_quantize")))
        return gm

    backend = aot_autograd(fw_compiler=count, bw_compiler=count, partition_fn=min_cut_rematerialization_partition)
    _step(torch.compile(block, backend=backend, fullgraph=True), x)
    return counts[0], counts[1]


@interp
@pytest.mark.parametrize("backward, expected", [("dequantized", (6, 0)), ("full", (6, 4))])
def test_interp_compiled_siblings_quantize_their_shared_input_once(backward, expected, fast_path_on_cpu):  # noqa: F811
    """q, k and v read one input: compiled, its forward operand (and in ``full`` its wgrad X^T operand) is quantized
    once, as eager mode shares it, because the three calls carry the same arguments (the sibling handle names them)
    and the graph's CSE merges them. Forward: 4 weights + X (q/k/v) + o's input (in ``full`` each X with its wgrad
    operand X^T, one paired call); full backward: 4 paired dY / dY^T calls."""
    fast_path_on_cpu()
    block, x, _ = _quantized_block(*BLOCKS["linear"], backward)
    assert _count_quantizations(block, x) == expected


def test_sibling_layers_share_one_handle_named_after_the_group():
    from quant.kernels import checks

    q = checks.register_sibling("test_group.attn.q")
    k = checks.register_sibling("test_group.attn.k")
    other = checks.register_sibling("test_group.mlp.up")
    assert int(q) == int(k) != int(other)
    assert checks.owner_name(q) == "one of test_group.attn.{q,k}"
    assert checks.owner_name(other) == "test_group.mlp.up"  # a layer without siblings keeps its own name
    assert int(checks.register_sibling("test_group.attn.q")) == int(q)  # registering again (unpickling) adds nothing
    assert checks.owner_name(q) == "one of test_group.attn.{q,k}"
