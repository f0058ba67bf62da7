"""quant.kernels (Triton) against the PyTorch reference and the SPEC vectors: bytes, not tolerances.

Two runs of this file:
* CPU: ``test_interpreter_suite`` starts a subprocess with ``TRITON_INTERPRET=1`` (the variable must be set before
  Triton compiles anything, so it cannot share this process) that runs every ``test_interp_*`` case on small CPU
  tensors through ``quant.kernels.ops``.
* GPU (``-m gpu``, CUDA and Triton present): the same comparisons on large tensors through the public API
  (``quant.nvfp4`` / ``quant.mxfp4`` dispatch CUDA tensors to the kernels), against the reference run on the CPU copy,
  plus stochastic-rounding statistics and the torch.compile graph check. Run it with ``--noconftest`` where Hydra is
  not installed (the shared conftest imports it).

Also here: the ``--quick`` smoke runs of both benchmarks, so the bench scripts cannot rot.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quant import mxfp4, nvfp4, rht
from quant.errors import QuantError

REPO = Path(__file__).resolve().parents[2]
INTERPRETER_FLAG = "FP4LAB_TEST_TRITON_INTERPRETER"
IN_INTERPRETER = os.environ.get(INTERPRETER_FLAG) == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_GPU_KERNELS = HAS_TRITON and torch.cuda.is_available() and not IN_INTERPRETER

interp = pytest.mark.skipif(not IN_INTERPRETER, reason="runs inside the Triton-interpreter subprocess "
                                                        "(test_interpreter_suite)")


def gpu_test(fn):
    """``@pytest.mark.gpu``, skipped without CUDA and Triton (and inside the interpreter subprocess)."""
    return pytest.mark.gpu(pytest.mark.skipif(not HAS_GPU_KERNELS, reason="needs CUDA and Triton")(fn))


if HAS_TRITON:
    import triton.language as tl
    from triton import jit

    from quant.kernels.nvfp4 import _philox_block_bits
    from quant.kernels.rounding import (
        bf16_bits,
        e2m1_magnitude,
        e2m1_rne,
        e2m1_sr,
        sign_bit,
    )

    @jit
    def _rounding_probe_kernel(x_ptr, magnitude_ptr, index_ptr, code_ptr, sr_ptr, sr_index_ptr, decoded_ptr, bf16_ptr,
                               n, NATIVE_BF16: tl.constexpr, BLOCK: tl.constexpr):
        """Applies the device rounding rules elementwise so a test can compare them with the reference directly; the
        stochastic rounding of element i uses the random byte (97 i) mod 256."""
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
        magnitude, index = e2m1_rne(tl.abs(x))
        tl.store(magnitude_ptr + offsets, magnitude, mask=mask)
        tl.store(index_ptr + offsets, index, mask=mask)
        tl.store(code_ptr + offsets, index | (sign_bit(x) >> 28).to(tl.int32), mask=mask)
        sr_magnitude, sr_index = e2m1_sr(tl.abs(x), (offsets * 97) & 255, NATIVE_BF16)
        tl.store(sr_ptr + offsets, sr_magnitude, mask=mask)
        tl.store(sr_index_ptr + offsets, sr_index, mask=mask)
        tl.store(decoded_ptr + offsets, e2m1_magnitude(index), mask=mask)
        tl.store(bf16_ptr + offsets, bf16_bits(x, NATIVE_BF16), mask=mask)


    @jit
    def _philox_probe_kernel(key_ptr, counter_ptr, index_ptr, ours_ptr, triton_ptr, n, BLOCK: tl.constexpr):
        """Philox words of ``nvfp4._philox_block_bits`` and of ``tl.philox`` for the same keys and counters."""
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        key = tl.load(key_ptr + offsets, mask=mask, other=0)
        counter = tl.load(counter_ptr + offsets, mask=mask, other=0)
        index = tl.load(index_ptr + offsets, mask=mask, other=0)
        ours = _philox_block_bits(key, counter, index)
        theirs = tl.philox(key, index.to(tl.uint32), (index >> 32).to(tl.uint32), counter.to(tl.uint32),
                           (counter >> 32).to(tl.uint32))
        for word in tl.static_range(4):
            tl.store(ours_ptr + 4 * offsets + word, ours[word].to(tl.int32, bitcast=True), mask=mask)
            tl.store(triton_ptr + 4 * offsets + word, theirs[word].to(tl.int32, bitcast=True), mask=mask)


def check_philox(device: str) -> None:
    """``nvfp4._philox`` (64-bit products) gives ``tl.philox``'s words for random 64-bit keys, counters and block
    indices: the SR stream did not change when the rounds were rewritten."""
    import triton

    g = torch.Generator().manual_seed(11)
    n = 4096
    key, counter, index = (torch.randint(-2**63, 2**63 - 1, (n,), generator=g, dtype=torch.int64).to(device)
                           for _ in range(3))
    index = index.abs()  # block indices are non-negative
    ours = torch.empty(4 * n, dtype=torch.int32, device=device)
    theirs = torch.empty_like(ours)
    _philox_probe_kernel[(triton.cdiv(n, 512),)](key, counter, index, ours, theirs, n, BLOCK=512)
    assert_same_bits(ours.cpu(), theirs.cpu(), "Philox words")
    assert len(set(ours.cpu().tolist())) > 4 * n - 8  # and they are not constant


def _kernel_ops():
    from quant import kernels

    return kernels.load()


def _int_view(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern of a float tensor (so -0.0 != 0.0 and NaN == NaN compare as bytes)."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    actual, expected = actual.cpu(), expected.cpu()
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (what, actual.shape, expected.shape)
    same = _int_view(actual) == _int_view(expected) if actual.is_floating_point() else actual == expected
    if not bool(same.all()):
        bad = (~same).nonzero()[:5]
        raise AssertionError(f"{what}: {int((~same).sum())} of {same.numel()} differ, first at {bad.tolist()}: "
                             f"{actual[tuple(bad.t())].tolist()} vs {expected[tuple(bad.t())].tolist()}")


def assert_same_nvfp4(q: nvfp4.NVFP4Tensor, ref: nvfp4.NVFP4Tensor) -> None:
    assert_same_bits(q.codes, ref.codes, "codes")
    assert_same_bits(q.scales, ref.scales, "scale bytes")
    assert_same_bits(q.amax.reshape(()), ref.amax.reshape(()), "amax")
    assert (q.shape, q.dtype, q.tile, q.rht, q.stochastic) == (ref.shape, ref.dtype, ref.tile, ref.rht, ref.stochastic)


def hard_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random data with the cases that break quantizers: an all-zero block, a tiny block (zero scale), a block whose
    scale is an E4M3 subnormal, exact E2M1 midpoints, -0.0 and negative values that round to zero."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape[:-1] + (1,), generator=g))
    flat = x.view(-1, shape[-1])
    k = min(16, shape[-1])
    if flat.shape[0] >= 4:
        flat[0, :k] = 0.0
        flat[1, :k] *= 1e-7
        flat[2, :k] *= 1e-4
        flat[3, :k] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.0, -1e-9, -0.75, 6.0, 4.5, -2.5, 0.3, 0.7,
                                    1.0])[:k]
    return x.to(dtype)


NVFP4_CASES = [  # (shape, dtype): odd shapes, K < 16, K not a multiple of 16, several programs along K, 3-D
    ((32, 64), torch.float32),
    ((33, 40), torch.bfloat16),
    ((5, 7, 48), torch.float16),
    ((17, 19), torch.float64),
    ((4, 8), torch.float32),
    ((20, 304), torch.bfloat16),
]


def check_nvfp4(x: torch.Tensor, tile: tuple[int, int], rht_on: bool, kernel_ops) -> None:
    """Kernel quantize / fake-quantize / dequantize / scaled codes == the reference on the CPU copy, byte for byte."""
    xc = x.cpu()
    ref = nvfp4.quantize(xc, tile=tile, rht=rht_on)
    q = kernel_ops.nvfp4_quantize(x, tile=tile, rht=rht_on)
    assert_same_nvfp4(q, ref)
    assert_same_bits(kernel_ops.nvfp4_fake_quantize(x, tile=tile, rht=rht_on),
                     nvfp4.fake_quantize(xc, tile=tile, rht=rht_on), "fake-quantized values")
    out = torch.float32 if x.dtype == torch.float64 else x.dtype
    assert_same_bits(kernel_ops.nvfp4_decode(q, out, scaled_codes=False).reshape(x.shape),
                     nvfp4.dequantize(ref, dtype=out), "dequantized values")
    assert_same_bits(kernel_ops.nvfp4_decode(q, torch.float32, scaled_codes=True),
                     nvfp4.scaled_codes(ref, torch.float32), "scaled codes")
    for dtype in (torch.bfloat16, torch.float32):  # codes and the GEMM operand from one pass
        q_scaled, values = _kernel_ops().nvfp4_quantize_scaled(x, tile=tile, rht=rht_on, dtype=dtype)
        assert_same_nvfp4(q_scaled, ref)
        assert_same_bits(values, nvfp4.scaled_codes(ref, dtype), f"scaled codes from the quantize pass ({dtype})")
    if not rht_on:  # codes, the GEMM operand and TE's dequantized values from one pass (dequantized backward)
        q_both, values, dequantized = _kernel_ops().nvfp4_quantize_both(x, tile=tile, dequantized_dtype=out)
        assert_same_nvfp4(q_both, ref)
        assert_same_bits(values, nvfp4.scaled_codes(ref, torch.bfloat16), "scaled codes next to dequantized values")
        assert_same_bits(dequantized.reshape(x.shape), nvfp4.dequantize(ref, dtype=out),
                         "dequantized values from the quantize pass")


def check_nvfp4_pair(x: torch.Tensor, kernel_ops, reference: bool = True) -> None:
    """The paired pass (X and RHT(X^T) from one read) == two ``nvfp4_quantize_scaled`` calls, bit for bit: amaxes and
    scaled codes, with round to nearest (and, with ``reference``, == the reference on the CPU copy: on a GPU only for
    data whose RHT sums are exact, ``test_gpu_rht_matches_cpu_reference``) and with SR (the same Philox bits for the
    same seeds)."""
    for stochastic in (False, True):
        seeds = torch.tensor([[11, 3], [2**40 + 5, 7]], dtype=torch.int64, device=x.device) if stochastic else None
        row_dtype = torch.float32 if stochastic else torch.bfloat16  # a convolution's dgrad dY is float32
        (amax, values), (amax_t, values_t) = kernel_ops.nvfp4_quantize_pair(x, stochastic=stochastic, seeds=seeds,
                                                                            dtype=row_dtype)
        q, expected = kernel_ops.nvfp4_quantize_scaled(x, stochastic=stochastic, seed=seeds[0] if stochastic else None,
                                                       dtype=row_dtype)
        q_t, expected_t = kernel_ops.nvfp4_quantize_scaled(x.t(), rht=True, stochastic=stochastic,
                                                           seed=seeds[1] if stochastic else None)
        what = "SR" if stochastic else "RN"
        assert_same_bits(amax, q.amax, f"rowwise amax ({what})")
        assert_same_bits(amax_t, q_t.amax, f"columnwise RHT amax ({what})")
        assert_same_bits(values, expected, f"rowwise scaled codes ({what})")
        assert_same_bits(values_t, expected_t, f"columnwise RHT scaled codes ({what})")
        if not stochastic and reference:
            reference = nvfp4.quantize(x.t().cpu(), rht=True)
            assert_same_bits(values_t.cpu(), nvfp4.scaled_codes(reference, torch.bfloat16), "columnwise vs reference")


# ---------------------------------------------------------------------------------------------------------------------
# CPU: the Triton interpreter in a subprocess
# ---------------------------------------------------------------------------------------------------------------------
# CPU: the Triton interpreter in a subprocess
# ---------------------------------------------------------------------------------------------------------------------
def run_interpreter_tests(test_file: str, timeout_s: float) -> None:
    """Run ``test_file``'s ``test_interp_*`` tests in a subprocess under the Triton interpreter (no CUDA) and assert
    they all passed: the interpreter must be switched on before triton is imported, hence a fresh process."""
    env = {**os.environ, INTERPRETER_FLAG: "1", "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "pytest", test_file, "-q", "-x", "--noconftest", "-k", "test_interp_",
               "-p", "no:cacheprovider", "-W", "ignore::RuntimeWarning"]
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and " failed" not in run.stdout, run.stdout[-3000:]


@pytest.mark.skipif(IN_INTERPRETER or not HAS_TRITON, reason="needs triton; this is the parent run")
def test_interpreter_suite():
    run_interpreter_tests(str(Path(__file__)), timeout_s=600)


@interp
@pytest.mark.parametrize("tile", [(1, 16), (16, 16)], ids=["1x16", "16x16"])
@pytest.mark.parametrize("shape,dtype", NVFP4_CASES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple)
                         else str(v).removeprefix("torch."))
def test_interp_nvfp4_matches_reference(shape, dtype, tile):
    check_nvfp4(hard_tensor(shape, dtype, seed=len(shape) * 100 + shape[-1]), tile, False, _kernel_ops())


@interp
def test_interp_nvfp4_reads_strided_views():
    kernel_ops = _kernel_ops()
    base = hard_tensor((48, 32), torch.bfloat16, seed=3)
    view = base.t()  # [32, 48], stride (1, 32): the wgrad operands are such views
    assert not view.is_contiguous()
    assert_same_nvfp4(kernel_ops.nvfp4_quantize(view), nvfp4.quantize(view.contiguous()))
    check_nvfp4(view, (16, 16), False, kernel_ops)


def rounding_probe_inputs() -> torch.Tensor:
    """float32 inputs for the device rounding rules: every bfloat16 bit pattern (signs, subnormals, +-inf, NaNs), the
    float32 neighbours of each E2M1 tie and saturation point, 2^17 random float32 bit patterns, and values in the top
    step of each E2M1 range (where t = a + u * step(a) crosses into the next range: the kernel rounds t down with
    step(a), the reference with step(t)), each 256 times in a row, so each meets every random byte (97 i mod 256)."""
    every_bf16 = (torch.arange(-2**15, 2**15, dtype=torch.int32) << 16).view(torch.float32)
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 2.0, 4.0])
    around = torch.cat([ties, torch.nextafter(ties, torch.zeros(())), torch.nextafter(ties, torch.full((), 8.0))])
    random_bits = torch.randint(-2**31, 2**31 - 1, (2**17,), generator=torch.Generator().manual_seed(0),
                                dtype=torch.int32).view(torch.float32)
    top_steps = torch.cat([torch.linspace(1.5, 2.0, 65), torch.linspace(3.0, 4.0, 65), torch.linspace(5.0, 6.0, 65)])
    top_steps = torch.cat([top_steps, torch.nextafter(torch.tensor([2.0, 4.0, 6.0]), torch.zeros(()))])
    return torch.cat([every_bf16, around, -around, random_bits, top_steps.repeat_interleave(256)])


def check_rounding_probe(device: str, native_bf16: bool) -> None:
    """``rounding.e2m1_rne`` / ``sign_bit`` / ``e2m1_sr`` / ``e2m1_magnitude`` / ``bf16_bits`` == the reference rules
    (``numerics.e2m1_encode_rne`` and ``e2m1_encode_stochastic``, PyTorch's bfloat16 cast) on
    ``rounding_probe_inputs``, bit for bit."""
    import triton

    from quant.numerics import e2m1_encode_rne, e2m1_encode_stochastic

    x = rounding_probe_inputs()
    n = x.numel()
    magnitude = torch.empty(n, device=device)
    sr_magnitude = torch.empty(n, device=device)
    index = torch.empty(n, dtype=torch.int32, device=device)
    code = torch.empty(n, dtype=torch.int32, device=device)
    sr_index = torch.empty(n, dtype=torch.int32, device=device)
    decoded = torch.empty(n, device=device)
    bf16 = torch.empty(n, dtype=torch.int16, device=device)
    _rounding_probe_kernel[(triton.cdiv(n, 1024),)](x.to(device), magnitude, index, code, sr_magnitude, sr_index,
                                                     decoded, bf16, n, NATIVE_BF16=native_bf16, BLOCK=1024)
    finite_or_inf = ~x.isnan()  # NaN saturates to 6 in the kernel; the reference never quantizes NaN (it raises)
    expected_code = e2m1_encode_rne(x).to(torch.int32)
    expected_index = expected_code & 7
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    assert_same_bits(index.cpu()[finite_or_inf], expected_index[finite_or_inf], "E2M1 RNE index")
    assert_same_bits(code.cpu()[finite_or_inf], expected_code[finite_or_inf], "E2M1 RNE code with sign_bit")
    assert_same_bits(magnitude.cpu()[finite_or_inf], grid[expected_index][finite_or_inf], "E2M1 RNE magnitude")
    random_bytes = (torch.arange(n) * 97) % 256
    expected_sr_index = (e2m1_encode_stochastic(x, random_bytes.to(torch.uint8)) & 7).to(torch.int32)
    assert_same_bits(sr_index.cpu()[finite_or_inf], expected_sr_index[finite_or_inf], "E2M1 SR index")
    assert_same_bits(sr_magnitude.cpu()[finite_or_inf], grid[expected_sr_index][finite_or_inf], "E2M1 SR magnitude")
    assert_same_bits(decoded.cpu(), grid[index.cpu()], "e2m1_magnitude(index)")
    # NaN becomes PyTorch's canonical bfloat16 NaN 0x7FC0 (PyTorch's own vectorised CPU cast keeps some payloads)
    expected_bf16 = torch.where(x.isnan(), 0x7FC0, x.to(torch.bfloat16).view(torch.int16).int()).to(torch.int16)
    assert_same_bits(bf16.cpu(), expected_bf16, f"bfloat16 bits (native={native_bf16})")


@pytest.mark.skipif(not HAS_TRITON or IN_INTERPRETER, reason="needs Triton's compiler (no GPU needed)")
@pytest.mark.parametrize("variant", ["1x16", "SR"])
def test_quantize_pass_compiled_for_hopper_has_no_rounding_conversions(variant):
    """The E2M1 and SR rules stay off the conversion pipe: the BF16 quantize pass compiled for sm_90
    (``bench.kernel_sass``, no GPU needed) has no per-element integer-to-float conversion or float rounding instruction
    (the SR pass had 33 ``I2F`` and 32 ``FRND`` for its 32 elements per thread before; the division's slow path keeps
    one ``I2F``), and every instruction is counted in one class."""
    from bench.kernel_sass import compile_quantize_pass, count

    sass = count(*compile_quantize_pass(variant, torch.bfloat16, 256, 256))
    assert sass.instructions > 100 and sass.instructions == sum(sass.by_class.values())
    conversions = sum(sass.by_opcode.get(opcode, 0) for opcode in ("I2F", "I2FP", "FRND"))
    assert conversions < sass.elements_per_thread / 8, sass.by_opcode


@interp
def test_interp_rounding_rules_on_every_bf16_and_random_float32():
    check_rounding_probe("cpu", native_bf16=False)


@interp
def test_interp_philox_equals_tritons():
    check_philox("cpu")


@interp
def test_interp_all_zero_tensor():
    q = _kernel_ops().nvfp4_quantize(torch.zeros(16, 32))
    assert float(q.amax) == 0.0 and int(q.codes.max()) == 0 and int(q.scales.max()) == 0


def spec_t1_t2_t3(kernel_ops, device: str) -> None:
    """Hand-computed SPEC vectors, independent of the reference implementation."""
    t1 = torch.tensor([[0, 0.25, 0.3125, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.25, -0.75, -2.875, -5.125, 4.5,
                        1.125]], dtype=torch.bfloat16, device=device)
    q = kernel_ops.nvfp4_quantize(t1)
    assert q.codes[0].tolist() == [0x00, 0x21, 0x42, 0x64, 0x76, 0xA8, 0xFD, 0x26]
    assert q.scales.tolist() == [[0x7E]] and float(q.amax) == 6.0
    dq = [0, 0, 0.5, 1, 1, 2, 2, 4, 4, 6, -0.0, -1, -3, -6, 4, 1]
    assert kernel_ops.nvfp4_fake_quantize(t1).float()[0].tolist() == dq

    t2 = torch.zeros(1, 128)
    rows = [[6.25, 1, -3, 0.5], [6.375, 1, -3, 0.5], [6.75, 1, -3, 0.5], [7.5, 1, -3, 0.5],
            [0.01, -0.004, 0, 0.0025], [0.005, -0.001, 0, 0], [0, 0, 0, 0], [2688, -100, 448, 1]]
    for block, values in enumerate(rows):
        t2[0, 16 * block: 16 * block + 4] = torch.tensor(values)
    q = kernel_ops.nvfp4_quantize(t2.to(device))
    assert q.scales[0].tolist() == [0x38, 0x38, 0x39, 0x3A, 0x01, 0x00, 0x00, 0x7E]
    assert q.codes[0, :2].tolist() == [0x27, 0x1D]
    fq = kernel_ops.nvfp4_fake_quantize(t2.to(device))[0]
    assert fq[32:36].tolist() == [6.75, 1.125, -3.375, 0.5625]
    assert fq[64:68].tolist() == [0.01171875, -0.00390625, 0, 0.0029296875]
    assert fq[80:84].tolist() == [0, 0, 0, 0]

    t3 = torch.zeros(1, 32)
    t3[0, :4] = torch.tensor([2.15625, -1.0, 0.5, 1.5])
    t3[0, 16:18] = torch.tensor([2.875, 0.1])
    q = kernel_ops.nvfp4_quantize(t3.to(device))
    assert q.scales[0].tolist() == [0x7B, 0x7E]  # 352, not torchao's 320: the block scale is rounded once
    assert q.codes[0, :2].tolist() == [0xD7, 0x63]  # codes [7, D, 3, 6]


def spec_t4(kernel_ops, device: str) -> None:
    w = torch.zeros(16, 16)
    w[0, 0], w[1, 0], w[1, 1] = 6.0, 0.75, -0.5
    w = w.to(device)
    two_d = kernel_ops.nvfp4_fake_quantize(w, tile=(16, 16))
    assert two_d[1, :2].tolist() == [1.0, -0.5]
    assert kernel_ops.nvfp4_quantize(w, tile=(16, 16)).scales[:, 0].tolist() == [0x7E] * 16
    one_d = kernel_ops.nvfp4_quantize(w, tile=(1, 16))
    assert one_d.scales[:2, 0].tolist() == [0x7E, 0x66] and one_d.scales[2:].max() == 0
    assert kernel_ops.nvfp4_fake_quantize(w)[1, :2].tolist() == [0.75, -0.5]
    x = hard_tensor((48, 80), torch.float32, seed=7).to(device)  # with 2D tiles, columnwise codes = rowwise transposed
    rowwise = kernel_ops.nvfp4_fake_quantize(x, tile=(16, 16))
    columnwise = kernel_ops.nvfp4_fake_quantize(x.t(), tile=(16, 16))
    assert_same_bits(columnwise.t(), rowwise, "2D tiles, columnwise vs rowwise")


def spec_t5(kernel_ops, device: str) -> None:
    x = torch.zeros(1, 16, dtype=torch.bfloat16)
    x[0, 0], x[0, 1], x[0, 5] = 8.0, 1.0, -2.0
    x = x.to(device)
    assert kernel_ops.nvfp4_rht(x).float()[0].tolist() == [2.75, 1.25, 2.75, 1.25, 1.75, 2.25, 1.75, 2.25] * 2
    q = kernel_ops.nvfp4_quantize(x, rht=True)
    assert float(q.amax) == 2.75
    codes = nvfp4.unpack_codes(q)[0].tolist()
    assert codes == [7, 5, 7, 5, 6, 6, 6, 6] * 2
    spec_dq = torch.tensor([2.75, 1.375, 2.75, 1.375, 1.8333334, 1.8333334])  # float32, rounded once to bf16 below
    assert kernel_ops.nvfp4_fake_quantize(x, rht=True)[0, :6].tolist() == spec_dq.bfloat16().tolist()
    assert nvfp4.unpack_codes(kernel_ops.nvfp4_quantize(x))[0, :6].tolist() == [7, 2, 0, 0, 0, 0xB]


@interp
@pytest.mark.parametrize("shape", [(48, 64), (7, 32), (3, 5, 16)], ids=lambda s: "x".join(map(str, s)))
def test_interp_rht_matches_reference(shape):
    kernel_ops = _kernel_ops()
    x = hard_tensor(shape, torch.bfloat16, seed=shape[0])
    assert_same_bits(kernel_ops.nvfp4_rht(x), rht.apply(x), "RHT output")
    check_nvfp4(x, (1, 16), True, kernel_ops)


@interp
@pytest.mark.parametrize("shape", [(32, 48), (64, 40), (48, 130)], ids=lambda s: "x".join(map(str, s)))
def test_interp_nvfp4_pair_equals_two_quantize_calls(shape):
    check_nvfp4_pair(hard_tensor(shape, torch.bfloat16, seed=shape[1]), _kernel_ops())


@interp
def test_interp_nvfp4_pair_reads_a_strided_view_and_refuses_partial_rht_chunks():
    x = hard_tensor((80, 64), torch.bfloat16, seed=3)
    check_nvfp4_pair(x.t(), _kernel_ops())  # [64, 80] with strides (1, 64), as dY^T-like views arrive
    with pytest.raises(QuantError, match="multiple of 16"):
        _kernel_ops().nvfp4_quantize_pair(x[:40], name_t="dY^T")


@interp
def test_interp_sr_probability_t6_and_seeding():
    """T6: y = 2.3 between 2 and 3 rounds up with probability 76/256; the generator state fixes the codes."""
    x = torch.full((64, 256), 2.3)
    x[:, ::16] = 6.0  # every block max 6 and global amax 6: the encode factor is exactly 1
    g = torch.Generator().manual_seed(11)
    kernel_ops = _kernel_ops()
    q = kernel_ops.nvfp4_quantize(x, stochastic=True, generator=g)
    values = nvfp4.dequantize(q)[:, torch.arange(256) % 16 != 0]
    assert bool(((values == 2) | (values == 3)).all())
    p, n = 76 / 256, values.numel()
    assert abs(float((values == 3).float().mean()) - p) < 4 * (p * (1 - p) / n) ** 0.5
    assert_same_bits(q.scales, nvfp4.quantize(x).scales, "SR keeps the RN scales")
    again = kernel_ops.nvfp4_quantize(x, stochastic=True, generator=torch.Generator().manual_seed(11))
    assert_same_bits(again.codes, q.codes, "same seed, same codes")
    other = kernel_ops.nvfp4_quantize(x, stochastic=True, generator=g)
    assert not torch.equal(other.codes, q.codes)


@interp
def test_interp_sr_mean_beats_round_to_nearest():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(16, 64, generator=g)
    kernel_ops = _kernel_ops()
    sr_mean = torch.stack([kernel_ops.nvfp4_fake_quantize(x, stochastic=True, generator=g) for _ in range(24)]).mean(0)
    rn = kernel_ops.nvfp4_fake_quantize(x)
    assert float((sr_mean - x).pow(2).mean()) < float((rn - x).pow(2).mean())


MXFP4_CASES = [
    ((8, 64), torch.float32), ((9, 70), torch.bfloat16), ((3, 5, 40), torch.float16), ((6, 20), torch.float64),
]


@interp
@pytest.mark.parametrize("scale_rule", ["floor", "rceil"])
@pytest.mark.parametrize("shape,dtype", MXFP4_CASES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple)
                         else str(v).removeprefix("torch."))
def test_interp_mxfp4_matches_reference(shape, dtype, scale_rule):
    check_mxfp4(hard_tensor(shape, dtype, seed=shape[-1]), scale_rule, _kernel_ops())


def check_mxfp4(x: torch.Tensor, scale_rule: str, kernel_ops) -> None:
    xc = x.cpu()
    ref = mxfp4.quantize(xc, scale_rule)
    q = kernel_ops.mxfp4_quantize(x, scale_rule)
    assert_same_bits(q.codes, ref.codes, "MXFP4 codes")
    assert_same_bits(q.scales, ref.scales, "E8M0 bytes")
    assert_same_bits(kernel_ops.mxfp4_fake_quantize(x, scale_rule), mxfp4.fake_quantize(xc, scale_rule), "MX values")
    assert_same_bits(kernel_ops.mxfp4_dequantize(q, torch.float32), mxfp4.dequantize(ref), "MX dequantized")


def spec_t7(kernel_ops, device: str) -> None:
    x = torch.zeros(4, 32)
    x[0, :4] = torch.tensor([5.0, -1.3, 0.2, 2.6])
    x[1, :4] = torch.tensor([7.0, 3.3, -0.9, 0.1])
    x[2, :4] = torch.tensor([0.3, -0.07, 0.15, 0.01])
    x[3, :4] = torch.tensor([3e-39, -1e-40, 1e-45, 0.0])  # float32 subnormal block max
    x = x.to(device)
    q = kernel_ops.mxfp4_quantize(x, "floor")
    assert q.scales[:3, 0].tolist() == [0x7F, 0x7F, 0x7B]
    assert kernel_ops.mxfp4_fake_quantize(x, "floor")[1, :4].tolist() == [6, 3, -1, 0]
    assert kernel_ops.mxfp4_fake_quantize(x, "rceil")[1, :4].tolist() == [8, 3, -1, 0]
    for rule in ("floor", "rceil"):
        check_mxfp4(x, rule, kernel_ops)


SPEC_VECTORS = {"t1_t2_t3": spec_t1_t2_t3, "t4_2d_tiles": spec_t4, "t5_rht": spec_t5, "t7_mxfp4": spec_t7}


@interp
@pytest.mark.parametrize("vector", SPEC_VECTORS)
def test_interp_spec_vectors(vector):
    SPEC_VECTORS[vector](_kernel_ops(), "cpu")


@interp
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_interp_non_finite_input_raises_naming_the_tensor(bad):
    kernel_ops = _kernel_ops()
    x = torch.randn(4, 32)
    x[1, 3] = bad
    for call in (lambda: kernel_ops.nvfp4_quantize(x, name="fc1 input"),
                 lambda: kernel_ops.nvfp4_fake_quantize(x, name="fc1 input"),
                 lambda: kernel_ops.mxfp4_fake_quantize(x, name="fc1 input")):
        with pytest.raises(QuantError, match="'fc1 input'.*NaN or Inf"):
            call()


@interp
def test_interp_amax_kernels_over_many_tiles():
    """Over 16 program tiles the amax kernels' atomics give max |x| (and max |RHT(x)|, max |RHT(x^T)|) computed in
    float64, with the largest value in the last tile; a NaN in the last tile makes the amax +inf and leaves the
    ticket (the smaller of two tickets when both operands of the pair kernel are poisoned)."""
    from quant.kernels import nvfp4 as nvfp4_kernels

    x = torch.randn(256, 256, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    x[250, 200] = 40.0  # the largest magnitude sits in the last tile
    never = 2**63 - 1
    flag = torch.full((1,), never, dtype=torch.int64)
    assert float(nvfp4_kernels.global_amax(x, False, flag, 7)) == float(x.double().abs().max()) == 40.0
    assert float(nvfp4_kernels.global_amax(x, True, flag, 7)) == float(rht.apply(x).double().abs().max())
    amax, _, amax_t, _ = nvfp4_kernels.quantize_pair_2d(x, flag, (7, 8), None, torch.bfloat16, torch.bfloat16)
    assert float(amax) == 40.0 and float(amax_t) == float(rht.apply(x.t().contiguous()).double().abs().max())
    assert int(flag) == never
    x[255, 255] = float("nan")
    assert float(nvfp4_kernels.global_amax(x, False, flag, 7)) == float("inf") and int(flag) == 7
    flag.fill_(never)
    amax, _, amax_t, _ = nvfp4_kernels.quantize_pair_2d(x, flag, (9, 8), None, torch.bfloat16, torch.bfloat16)
    assert float(amax) == float(amax_t) == float("inf") and int(flag) == 8


@interp
def test_interp_poisoned_tensor_decodes_to_nan():
    """Behind the check: a non-finite amax yields NaN scale bytes and values, never plausible numbers."""
    from quant.kernels import nvfp4 as nvfp4_kernels

    x = torch.randn(16, 32)
    x[2, 2] = float("nan")
    flag = torch.full((1,), 2**63 - 1, dtype=torch.int64)
    amax = nvfp4_kernels.global_amax(x, False, flag, 1234)
    assert float(amax) == float("inf") and int(flag) == 1234
    codes, scales, values, _ = nvfp4_kernels.quantize_2d(x, amax, 1, False, None, True, torch.float32)
    assert int(scales.min()) == 0x7F and bool(values.isnan().all())


@interp
@pytest.mark.parametrize("scale_rule", ["floor", "rceil"])
def test_interp_mxfp4_poisoned_blocks_and_clean_blocks(scale_rule):
    """MX scales are per block: a NaN or an Inf gives its own block the E8M0 NaN byte 0xFF and NaN values (PyTorch's
    BF16 NaN 0x7FC0), leaves the ticket, and every other block equals the reference bit for bit."""
    from quant.kernels import mxfp4 as mxfp4_kernels

    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    x[1, 5] = float("nan")
    x[2, 40] = float("inf")
    flag = torch.full((1,), 2**63 - 1, dtype=torch.int64)
    codes, scales, values = mxfp4_kernels.quantize_2d(x, scale_rule, True, torch.bfloat16, flag, 99)
    assert int(flag) == 99
    bad = torch.zeros(4, 3, dtype=torch.bool)
    bad[1, 0] = bad[2, 1] = True
    assert bool((scales[bad] == 0xFF).all()) and not bool((scales[~bad] == 0xFF).any())
    bad_values = bad.repeat_interleave(32, dim=1)
    assert bool((values.view(torch.int16)[bad_values] == 0x7FC0).all())
    clean = x.clone()
    clean[bad_values] = 0.0
    expected = mxfp4.fake_quantize(clean, scale_rule)
    assert_same_bits(values[~bad_values], expected[~bad_values], "clean MX blocks")


@interp
def test_interp_errors_are_the_reference_errors():
    kernel_ops = _kernel_ops()
    cases = [
        (lambda f: f(torch.randn(4, 32), tile=(8, 8)), "tile"),
        (lambda f: f(torch.randn(4, 32), rht=True), "bfloat16"),
        (lambda f: f(torch.randn(4, 20).bfloat16(), rht=True), "multiple of 16"),
        (lambda f: f(torch.ones(4, 32, dtype=torch.int32)), "dtype"),
    ]
    for call, word in cases:
        for function in (nvfp4.quantize, kernel_ops.nvfp4_quantize):
            with pytest.raises(QuantError, match=word):
                call(function)
    with pytest.raises(QuantError, match="scale_rule"):
        kernel_ops.mxfp4_quantize(torch.randn(4, 32), "ceil")


@interp
def test_interp_public_api_dispatch(monkeypatch):
    """The dispatch glue of quant.nvfp4 / quant.mxfp4 (CUDA tensors -> kernels), exercised on CPU tensors by letting
    the interpreter play the GPU: every public function returns the reference's bytes."""
    from quant import kernels

    x = hard_tensor((32, 48), torch.bfloat16, seed=8)
    expected = {
        "q": nvfp4.quantize(x, tile=(16, 16)), "fq": nvfp4.fake_quantize(x, rht=True),
        "mx": mxfp4.quantize(x, "rceil"), "mxf": mxfp4.fake_quantize(x),
    }
    expected["dq_rot"] = nvfp4.dequantize(nvfp4.quantize(x, rht=True), torch.bfloat16, undo_rht=True)
    monkeypatch.setattr(kernels, "enabled_for", lambda t: isinstance(t, torch.Tensor))
    q = nvfp4.quantize(x, tile=(16, 16))
    assert_same_nvfp4(q, expected["q"])
    assert_same_bits(nvfp4.dequantize(q, torch.bfloat16), nvfp4.dequantize(expected["q"], torch.bfloat16), "dequant")
    assert_same_bits(nvfp4.scaled_codes(q), nvfp4.scaled_codes(expected["q"]), "scaled codes")
    assert_same_bits(nvfp4.fake_quantize(x, rht=True), expected["fq"], "fake quant with RHT")
    rotated = nvfp4.dequantize(nvfp4.quantize(x, rht=True), torch.bfloat16, undo_rht=True)
    assert_same_bits(rotated, expected["dq_rot"], "dequantize(undo_rht=True)")
    mx = mxfp4.quantize(x, "rceil")
    assert_same_bits(mx.codes, expected["mx"].codes, "MX codes")
    assert_same_bits(mxfp4.dequantize(mx, torch.float16), mxfp4.dequantize(expected["mx"], torch.float16), "MX dq")
    assert_same_bits(mxfp4.fake_quantize(x), expected["mxf"], "MX fake quant")


@interp
def test_interp_custom_ops_pass_opcheck():
    """The torch.library registrations (fake shapes, schema) that let torch.compile see one node per quantization."""
    kernel_ops = _kernel_ops()
    x = hard_tensor((16, 48), torch.bfloat16, seed=1)
    seed = torch.tensor([3], dtype=torch.int64)
    torch.library.opcheck(torch.ops.fp4lab.nvfp4_quantize.default, (x, 16, False, None, "w"))
    torch.library.opcheck(torch.ops.fp4lab.nvfp4_fake_quantize.default, (x, 1, True, seed, "dy"))
    q = kernel_ops.nvfp4_quantize(x)
    torch.library.opcheck(torch.ops.fp4lab.nvfp4_decode.default, (q.codes, q.scales, q.amax, 48, torch.bfloat16, False))
    torch.library.opcheck(torch.ops.fp4lab.mxfp4_fake_quantize.default, (x, "rceil", "x"))
    owner = torch.tensor([0])
    torch.library.opcheck(torch.ops.fp4lab.nvfp4_quantize.default, (x, 1, False, seed, "dy", owner))
    acc = torch.randn(2, 32, 3, 5)
    amax_a, amax_b, bias = torch.tensor(3.5), torch.tensor(0.25), torch.randn(32).to(torch.bfloat16)
    torch.library.opcheck(torch.ops.fp4lab.gemm_epilogue.default, (acc, amax_a, amax_b, bias, 1, torch.bfloat16))
    torch.library.opcheck(torch.ops.fp4lab.gemm_epilogue.default,
                          (acc.to(memory_format=torch.channels_last), None, None, bias, 1, torch.float32))
    conv = ([2, 1], [1, 1], [1, 1], False, [0, 0])
    x4, w4 = torch.randn(2, 16, 6, 6), torch.randn(32, 16, 3, 3)
    dy4 = torch.randn(2, 32, 3, 6)
    torch.library.opcheck(torch.ops.fp4lab.tf32_convolution.default, (x4, w4, *conv))
    torch.library.opcheck(torch.ops.fp4lab.tf32_conv_input_grad.default, (dy4, w4, [2, 16, 6, 6], *conv))
    torch.library.opcheck(torch.ops.fp4lab.tf32_conv_weight_grad.default, (dy4, x4, [32, 16, 3, 3], *conv))
    torch.library.opcheck(torch.ops.fp4lab.rounded_mm.default, (x[:, :32], x.t()[:32]))
    torch.library.opcheck(torch.ops.fp4lab.conv_unfold.default, (x4, [3, 3], [3, 6], *conv[:3]))
    torch.library.opcheck(torch.ops.fp4lab.nvfp4_quantize_scaled.default,
                          (x, 16, False, None, "w", owner, torch.bfloat16))
    torch.library.opcheck(torch.ops.fp4lab.nvfp4_quantize_both.default,
                          (x, 16, "w", owner, torch.bfloat16, torch.float32))
    seeds = torch.tensor([[3, 0], [5, 1]], dtype=torch.int64)
    torch.library.opcheck(torch.ops.fp4lab.nvfp4_quantize_pair.default,
                          (x, seeds, "dy", "dy^T", owner, torch.float32, torch.bfloat16))
    torch.library.opcheck(torch.ops.fp4lab.nvfp4_quantize_pair.default,
                          (x, None, "x", "x^T", None, torch.bfloat16, torch.bfloat16))
    a, w = x[:, :32], hard_tensor((24, 32), torch.bfloat16, seed=2)
    torch.library.opcheck(torch.ops.fp4lab.scaled_gemm.default, (a, w.t(), amax_a, amax_b, bias[:24], torch.bfloat16))


@interp
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
def test_interp_scaled_convolution_without_a_cudnn_engine_takes_the_fp32_path(transposed, monkeypatch):
    """A geometry cuDNN's graph API cannot run (``cudnn_conv.scaled_convolution`` gives None) is served inside the
    same op by the FP32 convolution (or transposed convolution, with an output_padding) and the epilogue pass, with the
    channels-last output the op's fake promises (opcheck)."""
    from quant.kernels import cudnn_conv

    kernel_ops = _kernel_ops()
    monkeypatch.setattr(cudnn_conv, "scaled_convolution", lambda *args: None)
    x = (torch.randint(-6, 7, (2, 16, 6, 5)).float() * 0.5).bfloat16().contiguous(memory_format=torch.channels_last)
    w_shape = (16, 32, 3, 3) if transposed else (32, 16, 3, 3)
    w = (torch.randint(-6, 7, w_shape).float() * 0.25).bfloat16().contiguous(memory_format=torch.channels_last)
    amax_a, amax_b, bias = torch.tensor(3.7), torch.tensor(1.3), torch.randn(32).bfloat16()
    geometry = ([1, 2], [1, 1], [1, 1], transposed, [0, 1] if transposed else [0, 0])
    got = kernel_ops.scaled_convolution(x, w, amax_a, amax_b, bias, *geometry)
    acc = kernel_ops.tf32_convolution(x.float(), w.float(), *geometry)
    assert got.shape == acc.shape and got.is_contiguous(memory_format=torch.channels_last)
    assert_same_bits(got.contiguous(), kernel_ops.gemm_epilogue(acc, amax_a, amax_b, bias, 1, torch.bfloat16)
                     .contiguous(), "fallback of the fused convolution")
    torch.library.opcheck(torch.ops.fp4lab.scaled_convolution.default, (x, w, amax_a, amax_b, bias, *geometry))


# (x shape [N, C, H, W], kernel, positions or None for the sliding grid, stride, padding, dilation)
UNFOLD_CASES = [((2, 16, 9, 11), (3, 3), None, (1, 1), (1, 1), (1, 1)),
                ((3, 40, 12, 10), (3, 3), None, (2, 2), (1, 1), (1, 1)),
                ((2, 8, 13, 13), (5, 3), None, (1, 2), (2, 1), (2, 1)),
                ((2, 33, 7, 7), (1, 1), None, (2, 2), (0, 0), (1, 1)),
                ((2, 24, 6, 6), (2, 2), (3, 3), (2, 2), (0, 0), (1, 1))]  # a ConvTranspose2d's dY over its input


def _check_unfold_kernel(device: str) -> None:
    """``quant.kernels.unfold.unfold_tokens`` == ``quant.im2col.unfold_tokens`` (the specification) exactly, for NCHW,
    channels-last and strided-view inputs in BF16 and float32, every case of ``UNFOLD_CASES``."""
    from quant import im2col
    from quant.kernels import unfold

    for shape, kernel, positions, stride, padding, dilation in UNFOLD_CASES:
        grid = positions or im2col.sliding_grid(shape[2:], kernel, list(stride), list(padding), list(dilation))
        args = (list(kernel), list(grid), list(stride), list(padding), list(dilation))
        for dtype in (torch.bfloat16, torch.float32):
            base = torch.randn(shape[0], shape[1] + 3, shape[2], shape[3], device=device).to(dtype)
            for layout, x in (("nchw", base[:, 3:].contiguous()),
                              ("channels-last", base[:, 3:].contiguous(memory_format=torch.channels_last)),
                              ("strided view", base[:, 3:])):
                got = unfold.unfold_tokens(x, *args)
                expected = im2col.unfold_tokens(x, *args)
                assert got.shape == expected.shape and got.is_contiguous(), (shape, layout)
                assert torch.equal(got, expected), (shape, kernel, stride, padding, dilation, dtype, layout)


@interp
def test_interp_unfold_kernel_equals_unfold_tokens():
    _check_unfold_kernel("cpu")


@gpu_test
def test_gpu_unfold_kernel_equals_unfold_tokens():
    _check_unfold_kernel("cuda")


@interp
def test_interp_compiled_caller_has_no_graph_break():
    kernel_ops = _kernel_ops()

    def step(x: torch.Tensor, w: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
        y = kernel_ops.nvfp4_fake_quantize(x) @ kernel_ops.nvfp4_fake_quantize(w, tile=(16, 16)).t()
        return y + kernel_ops.nvfp4_fake_quantize(y, stochastic=True, seed=seed)  # SR seeded by a tensor

    x, w, seed = torch.randn(16, 32), torch.randn(32, 32), torch.tensor([7])
    explanation = torch._dynamo.explain(step)(x, w, seed)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(step, backend="eager", fullgraph=True)
    assert_same_bits(compiled(x, w, seed), step(x, w, seed), "compiled vs eager")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return _int_view(t) if t.is_floating_point() else t


@interp
def test_interp_epilogue_equals_the_reference_finish_in_every_layout():
    """One fused pass == ``gemm.finish``'s three PyTorch ops (acc * alpha, + bias, one rounding), bit for bit, for the
    accumulator layouts the layers produce; NaN (with the GPU's canonical payload 0x7FFFFFFF) stays NaN in BF16."""
    from quant import gemm

    kernel_ops = _kernel_ops()
    g = torch.Generator().manual_seed(0)
    acc = torch.randn(2, 48, 5, 7, generator=g) * torch.exp(4 * torch.randn(2, 48, 1, 1, generator=g))
    acc.view(-1)[:4] = torch.tensor([3.4e38, -3.4e38, float("inf"), 0.0])
    acc.view(torch.int32).view(-1)[4] = 0x7FFFFFFF  # NaN as the GPU writes it
    alpha = gemm.Alpha(torch.tensor(5.125), torch.tensor(0.0367))
    layouts = {"nchw": (acc, 1), "channels_last": (acc.to(memory_format=torch.channels_last), 1),
               "matrix": (acc.reshape(-1, 35), 0), "rows": (acc.reshape(96, 35).t(), 1),
               "permuted": (acc.permute(1, 0, 2, 3), 0)}
    for name, (tensor, bias_dim) in layouts.items():
        bias = torch.randn(tensor.shape[bias_dim], generator=g).to(torch.bfloat16)
        for out_dtype in (torch.bfloat16, torch.float32, torch.float16):
            for a, b in ((alpha, bias), (None, bias), (alpha, None), (None, None)):
                amaxes = (None, None) if a is None else (a.amax_a, a.amax_b)
                got = kernel_ops.gemm_epilogue(tensor, *amaxes, b, bias_dim, out_dtype)
                expected = gemm.finish(tensor, a, out_dtype, b, bias_dim)  # CPU tensor: the reference path
                assert got.stride() == tensor.stride(), name
                nan = expected.isnan()  # NaN payloads differ between PyTorch's CPU kernels and the GPU's
                assert torch.equal(got.isnan(), nan)
                assert_same_bits(got[~nan], expected[~nan],
                                 f"epilogue {name} {out_dtype} alpha={a is not None} bias={b is not None}")
    nan_out = kernel_ops.gemm_epilogue(acc, None, None, None, 1, torch.bfloat16).view(-1)[4]
    assert int(nan_out.view(torch.int16)) == 0x7FC0  # PyTorch's BF16 NaN, not -0.0


def _exact_sum_operands(m: int, n: int, k: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BF16 a [M, K] and w [N, K] of half-integers in [-6, 6] (E2M1 magnitudes): every product is a multiple of 1/4
    below 36, so every FP32 partial sum is exact for these K and the GEMM's result cannot depend on the summation
    order."""
    def draw(rows: int) -> torch.Tensor:
        return (torch.randint(-12, 13, (rows, k), generator=g) * 0.5).to(torch.bfloat16)
    return draw(m), draw(n)


@interp
def test_interp_scaled_gemm_equals_the_reference_epilogue():
    """The GEMM with the fused epilogue == ``gemm.finish`` of the FP32 accumulator (alpha, bias, one rounding), bit
    for bit, on the fused kernel (tile tails in M, N and K; b as a weight's transpose or row-major) and on the two-pass
    path it falls back to (N % 8 != 0, a strided a)."""
    from quant import gemm
    from quant.kernels import scaled_mm

    kernel_ops = _kernel_ops()
    g = torch.Generator().manual_seed(0)
    alpha = gemm.Alpha(torch.tensor(5.125), torch.tensor(0.0367))  # not a power of two: acc * alpha rounds
    cases = [(40, 24, 48, True), (130, 136, 80, True), (8, 16, 16, True), (33, 20, 48, False)]
    for m, n, k, expect_fused in cases:
        a, w = _exact_sum_operands(m, n, k, g)
        bias = torch.randn(n, generator=g).to(torch.bfloat16)
        strided = torch.zeros(m, 2 * k, dtype=torch.bfloat16)
        strided[:, ::2] = a
        operands = {"b = w^T": (a, w.t()), "b row-major": (a, w.t().contiguous()),
                    "strided a": (strided[:, ::2], w.t())}
        for layout, (a_in, b_in) in operands.items():
            fused = expect_fused and layout != "strided a"
            assert scaled_mm.fused(a_in, b_in, torch.bfloat16) is fused, (m, n, k, layout)
            for al, b in ((alpha, bias), (None, bias), (alpha, None)):
                amaxes = (None, None) if al is None else (al.amax_a, al.amax_b)
                got = kernel_ops.scaled_gemm(a_in, b_in, *amaxes, b, torch.bfloat16)
                expected = gemm.finish(_f64_gemm(a, w.t()), al, torch.bfloat16, b)  # CPU tensor: the reference
                assert got.is_contiguous()
                assert_same_bits(got, expected, f"scaled_gemm {m}x{n}x{k} {layout} alpha={al is not None} "
                                                f"bias={b is not None} fused={fused}")


@interp
def test_interp_philox_counter_extends_the_seed():
    """SR seeds are (key, counter): counter 0 is the old key-only stream, other counters give other bits."""
    kernel_ops = _kernel_ops()
    x = torch.full((64, 256), 2.3)
    x[:, ::16] = 6.0
    key = torch.tensor([12345])
    bare = kernel_ops.nvfp4_quantize(x, stochastic=True, seed=key).codes
    assert_same_bits(kernel_ops.nvfp4_quantize(x, stochastic=True, seed=torch.tensor([12345, 0])).codes, bare, "c 0")
    other = kernel_ops.nvfp4_quantize(x, stochastic=True, seed=torch.tensor([12345, 1])).codes
    assert not torch.equal(other, bare)
    values = nvfp4.dequantize(kernel_ops.nvfp4_quantize(x, stochastic=True, seed=torch.tensor([12345, 7])))
    values = values[:, torch.arange(256) % 16 != 0]
    p, n = 76 / 256, values.numel()
    assert abs(float((values == 3).float().mean()) - p) < 4 * (p * (1 - p) / n) ** 0.5  # SPEC T6 with a counter


def _f64_gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Float64 accumulation of exact products, rounded once: an FP32 GEMM independent of the summation order."""
    return (a.double() @ b.double()).float()


def _conv_stack() -> torch.nn.Sequential:
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(32, 16, 2, stride=2),
                         nn.ReLU(), nn.Conv2d(16, 32, 1), nn.Flatten(1), nn.Linear(32 * 10 * 10, 48), nn.ReLU(),
                         nn.Linear(48, 32))


def _train_step(model: torch.nn.Module, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 16, 5, 5, generator=g, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    y.float().square().mean().backward()
    return [y.detach(), x.grad] + [p.grad for p in model.parameters()]


def _fp32_conv_grads(geo, dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, need: tuple[bool, bool]):
    """``functional.rounded_conv_grads`` as FP32 convolutions rounded once (CPU convolutions in BF16 do not promise
    FP32 accumulation; the GPU test below holds cuDNN's BF16 kernels to this)."""
    dy32 = dy.to(torch.float32)
    grad_x = geo.input_grad(dy32, weight.to(torch.float32), x.shape).to(dy.dtype) if need[0] else None
    grad_w = geo.weight_grad(dy32, x.to(torch.float32), weight.shape).to(dy.dtype) if need[1] else None
    return grad_x, grad_w


def _fp32_scaled_conv(geo, x: torch.Tensor, weight: torch.Tensor, alpha, bias: torch.Tensor | None):
    """``functional.scaled_conv`` as the FP32 convolution (or transposed convolution) of the scaled codes and the
    epilogue pass (what the layers ran before cuDNN's graph API; the GPU tests hold that API to it). Like cuDNN's
    fused convolution, it needs TE's alpha: only two NVFP4 operands may reach it (other formats have none)."""
    from quant import gemm

    assert alpha is not None, "the fused convolution was given operands without TE's alpha (not two NVFP4 operands)"
    return gemm.finish(geo.convolution(x.float(), weight.float()), alpha, torch.bfloat16, bias, bias_dim=1)


@pytest.fixture
def fast_path_on_cpu(monkeypatch):
    """Runs the CUDA implementation of ``quant.gemm`` / ``quant.functional`` (BF16 operands, fused epilogue, TF32
    convolution ops, saved packed operands, Philox SR counters) on CPU tensors: the kernels in the interpreter, and an
    order-independent stand-in for ``torch.mm(out_dtype=float32)``, which CPU PyTorch lacks, and the FP32 convolution
    plus epilogue for cuDNN's fused convolutions (``_fp32_scaled_conv``). The reference path's
    contraction gets the same stand-in, so the two paths must agree bit for bit. Call the returned function to
    switch the dispatch on."""
    from quant import functional, gemm, kernels

    monkeypatch.setattr(gemm, "fused_gemm",
                        lambda a, b, alpha, bias, out_dtype: gemm.finish(_f64_gemm(a, b), alpha, out_dtype, bias))
    monkeypatch.setattr(gemm, "rounded_gemm", lambda a, b: _f64_gemm(a, b).to(a.dtype))
    monkeypatch.setattr(functional, "rounded_conv_grads", _fp32_conv_grads)
    monkeypatch.setattr(functional, "scaled_conv", _fp32_scaled_conv)
    monkeypatch.setattr(kernels.load(), "scaled_convolution_available", lambda: True)
    monkeypatch.setattr(gemm, "_contract", lambda a32, b32, exact: _f64_gemm(a32, b32))
    return lambda: monkeypatch.setattr(kernels, "enabled_for", lambda t: isinstance(t, torch.Tensor))


FAST_PATH_POLICIES = {
    "full": {"recipe": {"backward": "full"}},
    "full-w1x16": {"recipe": {"backward": "full", "disable_2d_quantization": True}},
    "dequantized": {"recipe": {"backward": "dequantized"}},
    "high_precision": {"recipe": {"backward": "high_precision"}},
    "full-weight-only": {"recipe": {"backward": "full"}, "roles": ("weight",)},
    "full-no-grad-role": {"recipe": {"backward": "full", "disable_rht": True}, "roles": ("weight", "input")},
    "mxfp4-full": {"format": "mxfp4", "recipe": {"backward": "full"}},
    "fp8-full": {"format": "fp8", "recipe": {"backward": "full"}},
}


@interp
@pytest.mark.parametrize("policy", list(FAST_PATH_POLICIES))
def test_interp_fast_path_layers_equal_the_reference_bit_for_bit(policy, fast_path_on_cpu):
    """Linear, Conv2d and ConvTranspose2d layers, forward and every gradient: the fast path (scaled codes from the
    quantize pass, dgrad from the forward's 16x16 codes, operands saved packed, no dtype round trips) equals the
    reference (RN here; SR draws differ)."""
    import copy

    import quant

    torch.manual_seed(0)
    model = _conv_stack()
    spec = FAST_PATH_POLICIES[policy]
    fmt = spec.get("format", "nvfp4")
    recipe = dict(spec["recipe"], **({"disable_stochastic_rounding": True} if fmt == "nvfp4" else {}))
    quant.apply(model, quant.Policy(format=fmt, recipe=quant.Recipe(**recipe), roles=spec.get("roles")))
    reference = _train_step(copy.deepcopy(model))
    fast_path_on_cpu()
    for i, (got, expected) in enumerate(zip(_train_step(copy.deepcopy(model)), reference)):
        assert_same_bits(got, expected, f"output/gradient {i}")


def _autocast_step(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Forward (BF16 autocast) and backward of a squared-mean loss: the output, the input's and every parameter's
    gradient."""
    xi = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(xi)
    y.float().square().mean().backward()
    return [y.detach(), xi.grad] + [p.grad for p in model.parameters()]


@interp
@pytest.mark.parametrize("backward", ["full", "dequantized"])
def test_interp_shared_input_operands_on_the_fast_path_equal_per_layer_and_the_reference(backward, fast_path_on_cpu):
    """q/k/v-style layers sharing their input's operands on the fast path (scaled codes from the quantize pass, packed
    saves decoded once in the backward) give the bits of per-layer quantization and of the reference path."""
    import copy

    import quant
    from quant import shared_operands
    from tests.quant.test_functional import SharedInputBlock

    torch.manual_seed(0)
    block = SharedInputBlock()
    quant.apply(block, quant.Policy(format="nvfp4", recipe=quant.Recipe(backward=backward,
                                                                        disable_stochastic_rounding=True)))
    x = torch.randn(2, 48, 64)
    reference = _autocast_step(copy.deepcopy(block), x)
    fast_path_on_cpu()
    with shared_operands.sharing(False):
        alone = _autocast_step(copy.deepcopy(block), x)
    shared = _autocast_step(copy.deepcopy(block), x)
    for i, (got, one, expected) in enumerate(zip(shared, alone, reference)):
        assert_same_bits(got, one, f"output/gradient {i}, shared vs per layer")
        assert_same_bits(got, expected, f"output/gradient {i}, fast path vs reference")


def _pointwise_conv_stack() -> torch.nn.Sequential:
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 1), nn.ReLU(),
                         nn.ConvTranspose2d(32, 16, 2, stride=2))


@interp
@pytest.mark.parametrize("kind, pairs", [("linear", 6), ("conv", 3)])
def test_interp_full_step_pairs_x_and_dy_and_equals_per_operand_quantization(kind, pairs, fast_path_on_cpu,
                                                                             monkeypatch):
    """``full`` on the fast path quantizes X with its wgrad X^T and dY with dY^T in paired passes (one amax read and
    one quantize read each). With SR on, the step equals the per-operand path bit for bit (each operand its own
    passes), because the paired kernel draws the same Philox bits; and the paired path is the one that ran.
    Linear (q/k/v sharing X): X of q/k/v and o's input in the forward, the 4 layers' dY in the backward. Convolutions:
    the 1x1 layer's X (its X^T is its pixel rows), the two Conv2d layers' dY (float32 dY for the 3x3 convolution's
    dgrad); the transposed convolution's wgrad dY is an im2col, not paired."""
    import copy

    import quant
    from quant import layer_formats
    from tests.quant.test_functional import SharedInputBlock

    torch.manual_seed(0)
    block = SharedInputBlock() if kind == "linear" else _pointwise_conv_stack()
    quant.apply(block, quant.Policy(format="nvfp4", recipe=quant.Recipe(backward="full")))
    x = torch.randn(2, 48, 64) if kind == "linear" else torch.randn(2, 16, 8, 8)  # 96 / 128 tokens: whole chunks
    fast_path_on_cpu()
    for layer in quant.quantized_modules(block).values():
        layer.quantizer.prime(x.device)  # both copies below start from the same Philox state
    kernel_ops, calls = _kernel_ops(), []
    pair = kernel_ops.nvfp4_quantize_pair
    monkeypatch.setattr(kernel_ops, "nvfp4_quantize_pair", lambda *a, **kw: calls.append(1) or pair(*a, **kw))
    paired = _autocast_step(copy.deepcopy(block), x)
    assert len(calls) == pairs
    monkeypatch.setattr(layer_formats.NVFP4Layer, "quantize_pair", lambda self, *args: None)
    per_operand = _autocast_step(copy.deepcopy(block), x)
    assert len(calls) == pairs
    for i, (got, expected) in enumerate(zip(paired, per_operand)):
        assert_same_bits(got, expected, f"output/gradient {i}, paired vs per-operand passes (SR on)")


def _row_shared_conv_stack() -> torch.nn.Sequential:
    """Conv2d layers whose ``full`` wgrad shares row taps (output widths 32, 16, 16), with a horizontal stride, a
    horizontal dilation, a kh of 2 without padding and a pad_h larger than kh - 1; then one with Co > 4 Ci, which
    keeps the im2col wgrad."""
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 16, (2, 3), stride=(1, 2), padding=(0, 1)), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=2, dilation=(1, 2)), nn.ReLU(), nn.Conv2d(16, 80, 3, padding=1))


@interp
@pytest.mark.parametrize("sr", [False, True], ids=["rn", "sr"])
def test_interp_row_shared_wgrad_equals_the_im2col_wgrad(sr, fast_path_on_cpu, monkeypatch):
    """The ``full`` wgrad of Conv2d layers with vertical stride 1 quantizes kw column taps of X instead of the kh*kw
    im2col taps and multiplies them with row-shifted dY^T (``functional._row_shared_wgrad``): every output and
    gradient equals the im2col path on the fast path (SR on: the same Philox draws for dY^T) and, with RN, on the
    reference path and across the two paths, bit for bit (the FP32 sums are order-independent here)."""
    import copy

    import quant
    from quant import functional

    torch.manual_seed(0)
    model = _row_shared_conv_stack()
    quant.apply(model, quant.Policy(format="nvfp4", recipe=quant.Recipe(backward="full",
                                                                        disable_stochastic_rounding=not sr)))
    x = torch.randn(2, 16, 12, 32)
    with monkeypatch.context() as im2col_wgrad:
        im2col_wgrad.setattr(functional, "_shares_row_taps", lambda *args: False)
        reference = None if sr else _autocast_step(copy.deepcopy(model), x)  # the reference path's im2col wgrad
    reference_shared = None if sr else _autocast_step(copy.deepcopy(model), x)
    for i, (got, expected) in enumerate(zip(reference_shared or [], reference or [])):
        assert_same_bits(got, expected, f"output/gradient {i}, reference path: row-shared vs im2col wgrad")
    fast_path_on_cpu()
    for layer in quant.quantized_modules(model).values():
        layer.quantizer.prime(x.device)  # the copies below start from the same Philox state
    shifts, row_shifted = [], functional._row_shifted
    monkeypatch.setattr(functional, "_row_shifted", lambda *a: shifts.append(a[1]) or row_shifted(*a))
    shared = _autocast_step(copy.deepcopy(model), x)
    assert shifts == [3, 2, 3]  # the first three layers took the shared path (backward order: last layer first)
    monkeypatch.setattr(functional, "_shares_row_taps", lambda *args: False)
    unshared = _autocast_step(copy.deepcopy(model), x)
    assert len(shifts) == 3
    for i, (got, expected) in enumerate(zip(shared, unshared)):
        assert_same_bits(got, expected, f"output/gradient {i}, row-shared vs im2col wgrad")
    for i, (got, expected) in enumerate(zip(shared, reference or [])):
        assert_same_bits(got, expected, f"output/gradient {i}, row-shared fast path vs reference")


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(32, 64), torch.nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


def _block_grads(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    y.float().square().mean().backward()
    return [p.grad.clone() for p in model.parameters()]


@interp
def test_interp_philox_sr_state_advances_restores_and_pickles(fast_path_on_cpu):
    import copy
    import pickle

    import quant

    fast_path_on_cpu()
    torch.manual_seed(0)
    model = torch.nn.Sequential(_Block(), _Block())
    quant.apply(model, quant.Policy(format="nvfp4", seed=3))
    x = torch.randn(2, 16, 32)
    _block_grads(model, x)
    states = quant.sr_states(model)
    assert all(state.numel() == 24 for state in states.values())  # Philox (tag, key, counter)
    assert len({bytes(state.numpy()[8:16]) for state in states.values()}) == 4  # one key per layer
    first = _block_grads(model, x)
    copies = [pickle.loads(pickle.dumps(model)), copy.deepcopy(model)]
    second = _block_grads(model, x)
    assert not all(torch.equal(a, b) for a, b in zip(first, second))  # fresh bits every call
    for clone in copies:  # the state travels with the model
        assert all(torch.equal(a, b) for a, b in zip(second, _block_grads(clone, x)))
    quant.load_sr_states(model, states)
    assert all(torch.equal(a, b) for a, b in zip(first, _block_grads(model, x)))
    fresh = torch.nn.Sequential(_Block(), _Block())
    fresh.load_state_dict(model.state_dict())
    quant.apply(fresh, quant.Policy(format="nvfp4", seed=3))
    quant.load_sr_states(fresh, states)  # restored before first use: applied when the state is created
    assert all(torch.equal(a, b) for a, b in zip(first, _block_grads(fresh, x)))


@interp
@pytest.mark.parametrize("backward", ["full", "dequantized", "high_precision"])
def test_interp_compiled_blocks_have_no_graph_break_no_per_layer_recompile_and_equal_eager(backward,
                                                                                           fast_path_on_cpu):
    """Compiled blocks (each block compiled on its own, as bench/train_step's "blocks" setting): no graph break inside
    the quantized layers, the same number of compiled frames for 2 and 6 blocks (no per-layer recompiles: nothing
    traced reads a layer's name or seed), and the same gradients as eager (SR included: same Philox counters)."""
    import quant
    from torch._dynamo.testing import CompileCounterWithBackend

    fast_path_on_cpu()
    frames = {}
    for blocks in (2, 6):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[_Block() for _ in range(blocks)])
        quant.apply(model, quant.Policy(format="nvfp4", recipe=quant.Recipe(backward=backward)))
        x = torch.randn(2, 16, 32, requires_grad=True)
        for layer in quant.quantized_modules(model).values():
            layer.quantizer.prime(x.device)
        states = quant.sr_states(model)
        eager = _block_grads(model, x)
        quant.load_sr_states(model, states)
        counter = CompileCounterWithBackend("aot_eager")
        for block in model:
            block.compile(backend=counter, fullgraph=True)  # fullgraph: a graph break is an error
        compiled = _block_grads(model, x)
        _block_grads(model, x)
        frames[blocks] = counter.frame_count
        for got, expected in zip(compiled, eager):
            assert_same_bits(got, expected, "compiled vs eager gradient")
    assert frames[2] == frames[6] <= 2, frames


@interp
def test_interp_nan_in_a_layer_operand_names_the_layer(fast_path_on_cpu):
    import quant

    fast_path_on_cpu()
    model = torch.nn.Sequential(torch.nn.Linear(32, 32))
    quant.apply(model, quant.Policy(format="nvfp4", recipe=quant.Recipe(disable_rht=True)))
    x = torch.randn(4, 32, requires_grad=True)
    dy = torch.randn(4, 32)
    dy[1, 2] = float("nan")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    with pytest.raises(QuantError, match="'0 output gradient \\(dgrad\\)' contains NaN"):
        y.backward(dy.to(torch.bfloat16))


# ---------------------------------------------------------------------------------------------------------------------
# GPU: the kernels behind the public API, on large tensors
# ---------------------------------------------------------------------------------------------------------------------
GPU_SHAPES = [(128, 128), (304, 304), (256, 272), (77, 100), (2048, 1040), (8, 128, 512), (1, 16)]
GPU_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@gpu_test
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("tile", [(1, 16), (16, 16)], ids=["1x16", "16x16"])
def test_gpu_nvfp4_matches_cpu_reference(shape, dtype, tile):
    x = hard_tensor(shape, dtype, seed=shape[-1]).cuda()
    check_nvfp4(x, tile, False, _PublicNVFP4)


@gpu_test
@pytest.mark.parametrize("native_bf16", [True, False], ids=["native-bf16", "integer-bf16"])
def test_gpu_rounding_rules_on_every_bf16_and_random_float32(native_bf16):
    check_rounding_probe("cuda", native_bf16)


@gpu_test
@pytest.mark.parametrize("vector", SPEC_VECTORS)
def test_gpu_spec_vectors(vector):
    """The hand-computed SPEC vectors on the compiled kernels (E4M3 ties, subnormal scales, RHT, MX exponents)."""
    SPEC_VECTORS[vector](_kernel_ops(), "cuda")


@gpu_test
@pytest.mark.parametrize("tile", [(1, 16), (16, 16)], ids=["1x16", "16x16"])
def test_gpu_nvfp4_large_bf16(tile):
    check_nvfp4(hard_tensor((4096, 4096), torch.bfloat16, seed=4).cuda(), tile, False, _PublicNVFP4)


@gpu_test
@pytest.mark.parametrize("shape", [(8192, 1024), (8192, 2816), (1040, 200)], ids=lambda s: "x".join(map(str, s)))
def test_gpu_nvfp4_pair_equals_two_quantize_calls(shape):
    """The paired pass of the ``full`` step on decoder shapes (and a tail) == the two single-operand kernels, and
    == the reference where the RHT sums are exact."""
    check_nvfp4_pair(hard_tensor(shape, torch.bfloat16, seed=5).cuda(), _kernel_ops(), reference=False)
    g = torch.Generator().manual_seed(shape[1])
    exact = (torch.randint(-2047, 2048, shape, generator=g).float() * 2.0**-8).bfloat16()
    check_nvfp4_pair(exact.cuda(), _kernel_ops())


@gpu_test
@pytest.mark.parametrize("shape", [(1024, 4096), (4096, 1024), (96, 64)], ids=lambda s: "x".join(map(str, s)))
def test_gpu_rht_matches_cpu_reference(shape):
    """Chunks of BF16 values k * 2^-8 with |k| < 2^11 have exact FP32 sums, so every summation order gives the same
    bits; random normal data may differ from the CPU matmul in the last FP32 bit of inexact sums, so there the RHT
    output is compared to the float64 transform and the quantization is checked on the kernel's own RHT output."""
    g = torch.Generator().manual_seed(shape[0])
    exact = (torch.randint(-2047, 2048, shape, generator=g).float() * 2.0**-8).bfloat16()
    check_nvfp4(exact.cuda(), (1, 16), True, _PublicNVFP4)
    x = hard_tensor(shape, torch.bfloat16, seed=2).cuda()
    kernel_rht = _kernel_ops().nvfp4_rht(x).cpu()
    exact_sum = (x.cpu().double().reshape(-1, 16) @ rht.rht_matrix(torch.float64)).reshape(shape)
    off_by_more_than_rounding = (kernel_rht.double() - exact_sum).abs() > exact_sum.abs() * 2.0**-8 + 1e-30
    assert not bool(off_by_more_than_rounding.any())
    assert float((kernel_rht != rht.apply(x.cpu())).float().mean()) < 1e-4
    q = nvfp4.quantize(x, rht=True)
    ref = nvfp4.quantize(kernel_rht)  # the reference quantizer applied to the kernel's RHT output
    for actual, expected, what in ((q.codes, ref.codes, "codes"), (q.scales, ref.scales, "scale bytes"),
                                   (q.amax, ref.amax, "post-RHT amax")):
        assert_same_bits(actual, expected, what)


@gpu_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_gpu_float32_subnormals_and_tiny_blocks(dtype):
    x = hard_tensor((256, 512), torch.float32, seed=9)
    x[10:20] *= 1e-38  # float32 subnormal products x * e and subnormal inputs
    x[30, :16] = torch.tensor([1e-45, -1e-45] * 8)
    check_nvfp4(x.to(dtype).cuda(), (1, 16), False, _PublicNVFP4)
    for rule in ("floor", "rceil"):
        check_mxfp4(x.to(dtype).cuda(), rule, _PublicMXFP4)


@gpu_test
@pytest.mark.parametrize("scale_rule", ["floor", "rceil"])
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", [(2048, 2048), (77, 100), (8, 128, 544)], ids=lambda s: "x".join(map(str, s)))
def test_gpu_mxfp4_matches_cpu_reference(shape, dtype, scale_rule):
    check_mxfp4(hard_tensor(shape, dtype, seed=4).cuda(), scale_rule, _PublicMXFP4)


@gpu_test
def test_gpu_philox_equals_tritons():
    check_philox("cuda")


@gpu_test
def test_gpu_sr_statistics_t6_and_mean_beats_rn():
    x = torch.full((1024, 1024), 2.3, device="cuda")
    x[:, ::16] = 6.0
    g = torch.Generator(device="cuda").manual_seed(0)
    values = nvfp4.dequantize(nvfp4.quantize(x, stochastic=True, generator=g))[:, torch.arange(1024) % 16 != 0]
    p, n = 76 / 256, values.numel()
    assert bool(((values == 2) | (values == 3)).all())
    assert abs(float((values == 3).float().mean()) - p) < 4 * (p * (1 - p) / n) ** 0.5
    y = torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16)
    for use_rht in (False, True):
        sr = torch.stack([nvfp4.fake_quantize(y, rht=use_rht, stochastic=True, generator=g).float()
                          for _ in range(50)]).mean(0)
        rn = nvfp4.fake_quantize(y, rht=use_rht).float()
        target = rht.apply(y).float() if use_rht else y.float()
        assert float((sr - target).pow(2).mean()) < float((rn - target).pow(2).mean())


@gpu_test
def test_gpu_non_finite_raises_asynchronously():
    from quant.kernels import checks

    x = torch.randn(256, 256, device="cuda")
    x[7, 7] = float("nan")
    with pytest.raises(QuantError, match="'layer.x'.*NaN or Inf"):
        nvfp4.quantize(torch.randn(64, 64, device="cuda"), name="layer.ok")
        nvfp4.quantize(x, name="layer.x")
        nvfp4.fake_quantize(torch.randn(64, 64, device="cuda"), name="layer.after")
        checks.raise_pending()
    nvfp4.quantize(torch.randn(16, 16, device="cuda"))
    checks.raise_pending()  # the flag was cleared with the error


@gpu_test
@pytest.mark.parametrize("m, n, k, fused", [(8192, 1024, 1024, True), (4096, 2048, 2816, True),
                                             (1000, 2816, 1024, False), (300, 136, 80, False), (64, 24, 16, False)])
def test_gpu_scaled_gemm_equals_the_epilogue_of_an_fp32_output_gemm(m, n, k, fused):
    """The fused GEMM on the tensor cores == cuBLAS with an FP32 output + the epilogue kernel: bit for bit where the
    FP32 sums are exact (E2M1 magnitudes), and on NVFP4 scaled codes of random data (whose FP32 sums may round
    differently in another order) in all but a rare element, by at most one BF16 ulp. Outputs of fewer than two tiles
    per multiprocessor take the two-pass path (``scaled_mm.fused``), with the same results."""
    from quant import gemm
    from quant.kernels import scaled_mm

    kernel_ops = _kernel_ops()
    g = torch.Generator().manual_seed(m + n + k)
    a, w = (t.cuda() for t in _exact_sum_operands(m, n, k, g))
    bias = torch.randn(n, generator=g).to(torch.bfloat16).cuda()
    amax_a, amax_b = torch.tensor(5.125, device="cuda"), torch.tensor(0.0367, device="cuda")

    def two_pass(a2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
        return kernel_ops.gemm_epilogue(torch.mm(a2, b2, out_dtype=torch.float32), amax_a, amax_b, bias, 1,
                                        torch.bfloat16)

    for b in (w.t(), w.t().contiguous()):
        assert scaled_mm.fused(a, b, torch.bfloat16) is fused  # fewer than two tiles per multiprocessor: two-pass
        assert_same_bits(kernel_ops.scaled_gemm(a, b, amax_a, amax_b, bias, torch.bfloat16), two_pass(a, b),
                         f"exact sums {m}x{n}x{k} b strides {b.stride()}")
    qa = nvfp4.quantize(torch.randn(m, k, generator=g).to(torch.bfloat16).cuda())
    qw = nvfp4.quantize(torch.randn(n, k, generator=g).to(torch.bfloat16).cuda())
    sa, sw = nvfp4.scaled_codes(qa, torch.bfloat16), nvfp4.scaled_codes(qw, torch.bfloat16)
    got = kernel_ops.scaled_gemm(sa, sw.t(), qa.amax, qw.amax, bias, torch.bfloat16)
    expected = gemm.finish(torch.mm(sa, sw.t(), out_dtype=torch.float32), gemm.Alpha(qa.amax, qw.amax),
                           torch.bfloat16, bias)
    ulps = (_int_view(got).int() - _int_view(expected).int()).abs()
    assert int(ulps.max()) <= 1 and float((ulps > 0).float().mean()) < 1e-4, (int(ulps.max()), int((ulps > 0).sum()))


def _cudnn_graph_api() -> bool:
    return HAS_GPU_KERNELS and _kernel_ops().scaled_convolution_available()


@gpu_test
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("x_shape, co, kernel, stride, padding, transposed, output_padding", [
    ((4, 64, 28, 28), 64, 3, 1, 1, False, 0), ((4, 32, 30, 30), 48, 3, 2, 1, False, 0),
    ((2, 16, 17, 19), 32, 5, 1, 2, False, 0), ((2, 128, 7, 7), 256, 3, 1, 1, False, 0),
    ((4, 64, 14, 14), 32, 2, 2, 0, True, 0), ((4, 64, 28, 28), 64, 3, 1, 1, True, 0),
    ((4, 48, 15, 15), 32, 3, 2, 1, True, 1), ((4, 16, 20, 20), 32, 3, 1, 1, True, 0)],
    ids=["3x3", "3x3-stride2", "5x5-odd", "7px", "up-2x2", "dgrad-3x3", "dgrad-3x3-stride2", "dgrad-16-channels"])
def test_gpu_scaled_convolution_equals_the_fp32_path(x_shape, co, kernel, stride, padding, transposed, output_padding,
                                                     bias):
    """cuDNN's convolution with TE's epilogue in the kernel (``scaled_convolution``: conv_fprop, or conv_dgrad for the
    transposed direction, which serves ConvTranspose2d forwards and Conv2d input gradients; with 16 reduced channels
    the op's own FP32 path, ``cudnn_conv._MIN_TRANSPOSED_CHANNELS``) == the TF32 convolution
    into an FP32 accumulator plus the epilogue pass, bit for bit, on scaled codes whose FP32 sums are exact (small
    multiples of powers of two: every summation order gives the same sum), with alpha not a power of two and a BF16
    bias; the output is channels-last. On random data the two differ only by summation order: rare last-bit
    differences."""
    if not _cudnn_graph_api():
        pytest.skip("needs the nvidia-cudnn-frontend package (cuDNN's graph API)")
    ops = _kernel_ops()
    g = torch.Generator(device="cuda").manual_seed(x_shape[1])
    channels_last = torch.channels_last
    w_shape = (x_shape[1], co, kernel, kernel) if transposed else (co, x_shape[1], kernel, kernel)
    x = (torch.randint(-6, 7, x_shape, device="cuda", generator=g).float() * 0.5).bfloat16()
    w = (torch.randint(-6, 7, w_shape, device="cuda", generator=g).float() * 0.25).bfloat16()
    x, w = x.contiguous(memory_format=channels_last), w.contiguous(memory_format=channels_last)
    amax_a, amax_b = torch.tensor(3.7, device="cuda"), torch.tensor(1.3, device="cuda")
    b = (torch.randn(co, device="cuda", generator=g) * 4).bfloat16() if bias else None
    geometry = ([stride, stride], [padding, padding], [1, 1], transposed, [output_padding, output_padding])
    got = ops.scaled_convolution(x, w, amax_a, amax_b, b, *geometry)
    acc = ops.tf32_convolution(x.float(), w.float(), *geometry)
    expected = ops.gemm_epilogue(acc, amax_a, amax_b, b, 1, torch.bfloat16)
    assert got.shape == expected.shape and got.is_contiguous(memory_format=channels_last)
    assert_same_bits(got.contiguous(), expected.contiguous(), "fused cuDNN convolution vs FP32 convolution + epilogue")
    xr = torch.randn(x_shape, device="cuda", generator=g).bfloat16().contiguous(memory_format=channels_last)
    got = ops.scaled_convolution(xr, w, amax_a, amax_b, b, *geometry).float()
    expected = ops.gemm_epilogue(ops.tf32_convolution(xr.float(), w.float(), *geometry), amax_a, amax_b, b, 1,
                                 torch.bfloat16).float()
    assert float((got != expected).float().mean()) < 1e-2
    assert torch.allclose(got, expected, rtol=2**-7, atol=1e-6)


@gpu_test
@pytest.mark.parametrize("transposed, kernel, stride", [(False, 3, 1), (False, 1, 2), (False, 3, 2), (True, 2, 2)])
def test_gpu_bf16_conv_grads_are_fp32_sums_rounded_once(transposed, kernel, stride):
    """``ConvGeometry.rounded_grads`` on the GPU (cuDNN convolutions of BF16 tensors writing BF16) == the FP32
    convolutions of the same values (TF32 reads BF16 values exactly) rounded once, in all but rare elements whose FP32
    sums round differently in another summation order (0.3% of dW's 6272-term sums on an H200). Those differ by at
    most one BF16 ulp plus an FP32 summation error (2^-14 of the sum of the terms' magnitudes; large in BF16 ulps only
    where the terms cancel). A kernel that accumulated or reduced split-K partial sums in BF16 would differ in most
    elements, by about 2^-8 of that sum."""
    from quant import functional

    g = torch.Generator().manual_seed(kernel * 10 + stride)
    padding = (0, 0) if transposed else (kernel // 2, kernel // 2)
    geo = functional.ConvGeometry(transposed, (stride, stride), padding, (1, 1))
    x = torch.randn(8, 64, 28, 28, generator=g).to(torch.bfloat16).cuda().to(memory_format=torch.channels_last)
    shape = (64, 128, kernel, kernel) if transposed else (128, 64, kernel, kernel)
    weight = (torch.randn(shape, generator=g) / kernel).to(torch.bfloat16).cuda()
    with torch.no_grad():
        y = torch.ops.aten.convolution(x, weight, None, list(geo.stride), list(geo.padding), list(geo.dilation),
                                       transposed, [0, 0], 1)
    dy = torch.randn(y.shape, generator=g).to(torch.bfloat16).cuda().to(memory_format=torch.channels_last)
    grad_x, grad_w = geo.rounded_grads(dy, x, weight, (True, True), torch.bfloat16)
    assert grad_x.dtype == grad_w.dtype == torch.bfloat16
    dy32, w32, x32 = dy.float(), weight.float(), x.float()
    for name, got, expected, magnitude in (
            ("dX", grad_x, geo.input_grad(dy32, w32, x.shape), geo.input_grad(dy32.abs(), w32.abs(), x.shape)),
            ("dW", grad_w, geo.weight_grad(dy32, x32, weight.shape),
             geo.weight_grad(dy32.abs(), x32.abs(), weight.shape))):
        rounded = expected.to(torch.bfloat16)
        differs = _int_view(got) != _int_view(rounded)
        assert float(differs.float().mean()) < 2e-2, (name, float(differs.float().mean()))
        one_ulp = (rounded.float().abs() * 2.0 ** -7).clamp_min(2.0 ** -126)
        error = (got.float() - expected).abs()
        assert bool((error <= one_ulp + magnitude * 2.0 ** -14).all()), (name, float((error / magnitude).max()))


@gpu_test
def test_gpu_dispatch_uses_kernels_and_reference_agrees_on_gpu():
    from quant import kernels

    x = hard_tensor((512, 1024), torch.bfloat16, seed=1).cuda()
    assert kernels.enabled_for(x)
    with kernels.disabled():
        assert not kernels.enabled_for(x)
        ref_gpu = nvfp4.quantize(x, tile=(16, 16))
    assert_same_nvfp4(nvfp4.quantize(x, tile=(16, 16)), ref_gpu)


@gpu_test
@pytest.mark.parametrize("backward", ["full", "dequantized", "high_precision"])
def test_gpu_compiled_quantized_linear_has_no_graph_break(backward):
    import quant

    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256)).cuda()
    quant.apply(model, quant.Policy(format="nvfp4", recipe=quant.Recipe(backward=backward)))
    x = torch.randn(4, 128, 256, device="cuda", requires_grad=True)

    def step(inp):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model(inp).float().pow(2).mean()

    step(x).backward()  # eager first: the layers' SR state exists before tracing
    explanation = torch._dynamo.explain(step)(x)
    assert explanation.graph_break_count == 0, [str(r.reason) for r in explanation.break_reasons]
    states = quant.sr_states(model)
    eager_grad = torch.autograd.grad(step(x), x)[0]
    quant.load_sr_states(model, states)  # the compiled step draws the same SR bits (same Philox counters)
    compiled_grad = torch.autograd.grad(torch.compile(step, fullgraph=True)(x), x)[0]
    # Inductor compiles the GELU and the loss with its own kernels (BF16 ulps); the quantized layers are custom ops.
    # With SR an ulp of difference in dY can move a value across a rounding threshold: compare norms there.
    assert float((compiled_grad - eager_grad).norm()) <= 0.05 * float(eager_grad.norm())
    if backward != "full":
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=2e-2, atol=1e-6)


@gpu_test
def test_gpu_poll_reports_a_poisoned_tensor_without_raise_pending():
    from quant.kernels import checks

    x = torch.randn(256, 256, device="cuda")
    x[3, 5] = float("inf")
    with pytest.raises(QuantError, match="'layer.x'.*found by the asynchronous check"):
        nvfp4.quantize(x, name="layer.x")
        for _ in range(4 * checks._POLL_EVERY):  # the throttled poll must see the flag within a few quantizations
            torch.cuda.synchronize()
            nvfp4.quantize(torch.randn(16, 16, device="cuda"))
    checks.raise_pending()


def _captured_training_step(model: torch.nn.Module, x: torch.Tensor):
    """(step, grads): one forward + backward of ``model`` under BF16 autocast; grads are the parameters' .grad."""
    def step() -> list[torch.Tensor]:
        for p in model.parameters():
            p.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            y = model(x)
        y.float().square().mean().backward()
        return [p.grad for p in model.parameters()]

    return step


@gpu_test
def test_gpu_cuda_graph_replays_equal_eager_steps_and_advance_sr_counters():
    """A forward + backward captured in a CUDA graph (``backward=full``: SR on dY, RHT, 16x16 weights) replays the
    bits of the same eager steps, with the SR counters advancing on every replay; a NaN fed to a replay is reported
    by ``raise_pending``."""
    import quant
    from quant.kernels import checks

    def make() -> torch.nn.Module:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(256, 512, bias=False), torch.nn.GELU(),
                                    torch.nn.Linear(512, 256)).cuda()
        quant.apply(model, quant.Policy(format="nvfp4", recipe=quant.Recipe(backward="full")))
        for layer in quant.quantized_modules(model).values():
            layer.quantizer.prime(torch.device("cuda"))
        return model

    x = torch.randn(128, 256, device="cuda")
    eager_step = _captured_training_step(make(), x)
    eager = [[g.clone() for g in eager_step()] for _ in range(5)]
    graph_model = make()
    step = _captured_training_step(graph_model, x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up: eager steps 0 and 1
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        grads = step()
    replays = []
    for _ in range(3):
        graph.replay()
        replays.append([g.clone() for g in grads])
    for j, replay in enumerate(replays):  # replay j is eager step 2 + j: same weights, same SR counters
        for i, (got, want) in enumerate(zip(replay, eager[2 + j])):
            assert_same_bits(got, want, f"replay {j}, gradient {i}")
    assert not torch.equal(replays[0][0], replays[1][0])  # SR drew new bits on the next replay
    checks.raise_pending()
    x.fill_(float("nan"))
    graph.replay()
    with pytest.raises(QuantError, match="NaN or Inf"):
        checks.raise_pending()


class _SharedInputMLP(torch.nn.Module):
    """A BF16 non-leaf input read by three Linears (q/k/v style: they share its operands) and then by nothing else."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(256))
        self.q, self.k, self.v = (torch.nn.Linear(256, 256, bias=False) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = (x * self.scale).to(torch.bfloat16)
        return self.q(h) * self.k(h) + self.v(h)


@gpu_test
@pytest.mark.parametrize("backward", ["dequantized", "full"])
def test_gpu_capture_after_an_eager_step_on_the_default_stream(backward):
    """The bench's order: one eager step on the default stream, warm-up on a side stream, capture there. Shared
    operands once kept the eager step's autograd graph alive, so its AccumulateGrad nodes (default stream) served the
    captured backward and the capture failed ("would make the legacy stream depend on a capturing blocking stream")."""
    import quant

    torch.manual_seed(0)
    model = _SharedInputMLP().cuda()
    quant.apply(model, quant.Policy(format="nvfp4", recipe=quant.Recipe(backward=backward)))
    for layer in quant.quantized_modules(model).values():
        layer.quantizer.prime(torch.device("cuda"))
    step = _captured_training_step(model, torch.randn(128, 256, device="cuda"))
    step()  # eager, default stream
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        grads = step()
    graph.replay()
    torch.cuda.synchronize()
    assert all(bool(g.isfinite().all()) for g in grads)


class _PublicNVFP4:
    """The public API with the names ``check_nvfp4`` expects (CUDA tensors dispatch to the kernels)."""

    nvfp4_quantize = staticmethod(nvfp4.quantize)
    nvfp4_fake_quantize = staticmethod(nvfp4.fake_quantize)

    @staticmethod
    def nvfp4_decode(q, dtype, scaled_codes):
        return nvfp4.scaled_codes(q, dtype) if scaled_codes else nvfp4.dequantize(q, dtype=dtype)


class _PublicMXFP4:
    mxfp4_quantize = staticmethod(mxfp4.quantize)
    mxfp4_fake_quantize = staticmethod(mxfp4.fake_quantize)
    mxfp4_dequantize = staticmethod(lambda q, dtype: mxfp4.dequantize(q, dtype))


# ---------------------------------------------------------------------------------------------------------------------
# Benchmark smoke runs (CPU, tiny sizes): the scripts must keep working
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(IN_INTERPRETER, reason="parent run only")
@pytest.mark.parametrize("script", ["kernel_throughput", "train_step", "host_overhead"])
def test_bench_quick_smoke(script, tmp_path):
    """``--quick`` end to end in a subprocess: kernel_throughput with the kernels in the Triton interpreter,
    train_step on the tiny decoder (BF16 and NVFP4 full, eager and compiled blocks, graph-break check, profile),
    host_overhead on the reference path (every row, and the cProfile of a quantized stack)."""
    out = tmp_path / f"{script}.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    if script == "kernel_throughput" and HAS_TRITON:
        env["TRITON_INTERPRET"] = "1"
    run = subprocess.run([sys.executable, "-m", f"bench.{script}", "--quick", "--out", str(out)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    result = json.loads(out.read_text())
    if script == "host_overhead":
        assert all(row["host_us"] > 0 for row in result["rows"]) and len(result["rows"]) == 8, result["rows"]
        assert "tottime" in result["cprofile"] and f"{os.sep}quant{os.sep}" in result["cprofile"]
        return
    timed = [row for row in result["rows"] if "timing" in row or "kernel" in row or "reference_eager" in row]
    assert timed and all(row.get("bit_exact", True) for row in result["rows"]), result["rows"]
    if script == "train_step":
        assert {row["mode"] for row in timed} == {"bf16", "nvfp4-full"} and result["graph_breaks"] and result["profile"]


@pytest.mark.skipif(IN_INTERPRETER, reason="parent run only")
def test_bench_train_step_graph_settings_refuse_a_cpu_device_by_name():
    pytest.importorskip("omegaconf")
    import argparse

    from bench import train_step

    work = train_step.workloads(quick=True)["decoder"]
    args = argparse.Namespace(compile_backend="eager", warmup=0, steps=1)
    for setting in ("graph", "blocks+graph"):
        with pytest.raises(RuntimeError, match=re.escape(f"--compile {setting} captures CUDA graphs: it needs a CUDA")):
            train_step.time_config(work, "bf16", setting, args, torch.device("cpu"))


@pytest.mark.skipif(IN_INTERPRETER, reason="parent run only")
def test_bench_capture_code_paths_take_transformers_capture_branch_and_restore_it():
    """The warm-up before a CUDA-graph capture sees transformers' capture-time branch (``is_tracing`` true), and the
    library's own function is back afterwards, also after an error."""
    utils = pytest.importorskip("transformers.utils.import_utils")
    if not hasattr(utils, "is_cuda_stream_capturing"):
        pytest.skip("this transformers has no capture-dependent branch")
    pytest.importorskip("omegaconf")
    from bench import train_step

    original = utils.is_cuda_stream_capturing
    assert not utils.is_tracing()
    with pytest.raises(ValueError):
        with train_step._capture_code_paths():
            assert utils.is_tracing()
            raise ValueError("inside")
    assert utils.is_cuda_stream_capturing is original and not utils.is_tracing()


@pytest.mark.skipif(IN_INTERPRETER, reason="parent run only")
@pytest.mark.parametrize("model", ["unet", "resnet50"])
def test_bench_train_step_workloads_run_a_step(model):
    """The other two workloads of bench/train_step (quick sizes): built by models.build_model, one quantized step."""
    pytest.importorskip("omegaconf")
    from bench import train_step

    work = train_step.workloads(quick=True)[model]
    built, quantized, blocks = train_step.build(work, "nvfp4-dequantized", torch.device("cpu"))
    assert len(quantized) > 0 and blocks
    before = [p.detach().clone() for p in built.parameters()]
    train_step.make_step(built, work, torch.device("cpu"))()
    assert any(not torch.equal(b, p) for b, p in zip(before, built.parameters()))
