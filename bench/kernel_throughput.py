"""Throughput of the fused quantization kernels against a device-to-device copy and the PyTorch reference.

For each variant (NVFP4 1x16 / 16x16 / SR / RHT / RHT+SR fake-quantize, NVFP4 quantize-to-codes and decode, MXFP4
floor / rceil fake-quantize) on one large tensor per dtype, measured side by side in one run:

* kernel time (median of CUDA-event timings of a CUDA-graph replay of the call after an L2 flush, so the host's
  Python and launch cost stay out; 10th-90th percentile spread; the copy is timed the same way), effective bandwidth
  = the fewest bytes the operation must move (input read once, output written once; the global-amax pass is not
  counted, it is part of the cost) / time, and that bandwidth as a fraction of a ``copy_`` of the same tensor;
* for the NVFP4 fake-quantize variants, the fused quantize-dequantize pass alone (``quant.kernels.nvfp4.quantize_2d``
  with the global amax computed beforehand, outside the timing) as a fraction of the copy: the whole call is that
  pass plus the amax reduction's read of the tensor, which a per-tensor scale needs first (SPEC 1.2 step 1), so the
  whole call cannot pass about 2/3 of a copy's bandwidth (it moves 3 tensor-sizes to the copy's 2); MXFP4 has no
  per-tensor scale and is one pass;
* the reference (``quant.nvfp4`` / ``quant.mxfp4`` with the kernels disabled) in eager mode and, for the BF16 input
  of the variants in ``--compile-variants``, under ``torch.compile``; the kernel's speed-up over each;
* whether the kernel's bytes equal the reference's (round-to-nearest variants; SR is statistical).

Usage (repository root): python -m bench.kernel_throughput [--rows 8192 --cols 4096] [--dtypes bfloat16,float32]
  [--reps 50] [--no-compile | --compile-variants "nvfp4 1x16 fake-quant,..."] [--sweep] [--out results.json] [--quick]
``--quick``: tiny CPU smoke run, bfloat16 only (kernels only with TRITON_INTERPRET=1; compile column with the eager
backend). Imports only torch, triton and ``quant``.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from bench.timing import Timing, environment, measure, replayed, table, write_json
from quant import kernels, mxfp4, nvfp4


@dataclass(frozen=True)
class Variant:
    name: str
    needs_bf16: bool
    exact: bool  # deterministic output that must equal the reference
    kernel: Callable[[Tensor], object]
    reference: Callable[[Tensor], object]
    bytes_moved: Callable[[Tensor], int]  # fewest bytes: input read + output written
    fused_pass: Callable[[Tensor], Callable[[], object]] | None = None  # x -> the quantize pass with x's amax known


COMPILED_BY_DEFAULT = ("nvfp4 1x16 fake-quant", "nvfp4 16x16 fake-quant", "nvfp4 RHT+SR fake-quant")


def _fake_quant_bytes(x: Tensor) -> int:
    return 2 * x.numel() * x.element_size()


def _codes_bytes(x: Tensor) -> int:
    return x.numel() * x.element_size() + x.numel() // 2 + x.numel() // 16


def _pair_bytes(x: Tensor) -> int:
    return 3 * x.numel() * x.element_size()  # x read once, two operands of x's dtype written


def _reference_pair(x: Tensor) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """What ``nvfp4_quantize_pair`` returns, from two reference quantizations (x, and x^T with the RHT)."""
    rowwise, columnwise = nvfp4.quantize(x), nvfp4.quantize(x.t().contiguous(), rht=True)
    return ((rowwise.amax.reshape(()), nvfp4.scaled_codes(rowwise, x.dtype)),
            (columnwise.amax.reshape(()), nvfp4.scaled_codes(columnwise, x.dtype)))


def _nvfp4_fused_pass(tile_rows: int, rht: bool, stochastic: bool) -> Callable[[Tensor], Callable[[], object]]:
    """x -> a call of the fake-quantize's second kernel alone (``quantize_2d``), its global amax computed now."""
    from quant.kernels import nvfp4 as nvfp4_kernels

    def prepare(x: Tensor) -> Callable[[], object]:
        flag = torch.full((1,), torch.iinfo(torch.int64).max, dtype=torch.int64, device=x.device)
        amax = nvfp4_kernels.global_amax(x, rht, flag, 1)
        seed = torch.tensor([1, 0], dtype=torch.int64, device=x.device) if stochastic else None
        return lambda: nvfp4_kernels.quantize_2d(x, amax, tile_rows, rht, seed, False, x.dtype)

    return prepare


def variants(kernel_ops, generator: torch.Generator) -> list[Variant]:
    """The measured operations; ``kernel_ops`` is ``quant.kernels.ops`` (None: only the reference columns run)."""
    def nv(tile=(1, 16), rht=False, stochastic=False):
        kw = dict(tile=tile, rht=rht, stochastic=stochastic)
        fused_pass = None if kernel_ops is None else _nvfp4_fused_pass(tile[0], rht, stochastic)
        return dict(kernel=lambda x: kernel_ops.nvfp4_fake_quantize(x, generator=generator, **kw),
                    reference=lambda x: nvfp4.fake_quantize(x, generator=generator, **kw),
                    bytes_moved=_fake_quant_bytes, fused_pass=fused_pass)

    def mx(rule):
        return lambda x: kernel_ops.mxfp4_fake_quantize(x, rule), lambda x: mxfp4.fake_quantize(x, rule)

    kernel_codes: dict[int, nvfp4.NVFP4Tensor] = {}  # quantized once per input, outside the timed decode
    reference_codes: dict[int, nvfp4.NVFP4Tensor] = {}

    def decode_kernel(x: Tensor) -> Tensor:
        if id(x) not in kernel_codes:
            kernel_codes[id(x)] = kernel_ops.nvfp4_quantize(x)
        return kernel_ops.nvfp4_dequantize(kernel_codes[id(x)], x.dtype)

    def decode_reference(x: Tensor) -> Tensor:
        if id(x) not in reference_codes:
            reference_codes[id(x)] = nvfp4.quantize(x)
        return nvfp4.dequantize(reference_codes[id(x)], x.dtype)

    return [
        Variant("nvfp4 1x16 fake-quant", False, True, **nv()),
        Variant("nvfp4 16x16 fake-quant", False, True, **nv(tile=(16, 16))),
        Variant("nvfp4 1x16 SR fake-quant", False, False, **nv(stochastic=True)),
        Variant("nvfp4 1x16 RHT fake-quant", True, True, **nv(rht=True)),
        Variant("nvfp4 RHT+SR fake-quant", True, False, **nv(rht=True, stochastic=True)),
        Variant("nvfp4 quantize (codes)", False, True, lambda x: kernel_ops.nvfp4_quantize(x), nvfp4.quantize,
                _codes_bytes),
        Variant("nvfp4 dequantize", False, True, decode_kernel, decode_reference, _codes_bytes),
        Variant("nvfp4 pair X + RHT(X^T) (QAT full)", True, True, lambda x: kernel_ops.nvfp4_quantize_pair(x),
                _reference_pair, _pair_bytes),
        Variant("mxfp4 floor fake-quant", False, True, *mx("floor"), _fake_quant_bytes),
        Variant("mxfp4 rceil fake-quant", False, True, *mx("rceil"), _fake_quant_bytes),
    ]


def _same(a: object, b: object) -> bool:
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, nvfp4.NVFP4Tensor):
        return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("codes", "scales")) and torch.equal(
            a.amax.reshape(()), b.amax.reshape(()))
    return torch.equal(a.view(torch.int16 if a.element_size() == 2 else torch.int32),
                       b.view(torch.int16 if b.element_size() == 2 else torch.int32))


def _ms(t: Timing | None) -> str | None:
    return None if t is None else f"{t.median_ms:.3f}"


def run(args: argparse.Namespace) -> dict[str, object]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    interpreted = device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    kernel_ops = kernels.load() if (device.type == "cuda" or interpreted) else None
    generator = torch.Generator(device=device).manual_seed(0)
    results: list[dict[str, object]] = []
    copies: dict[str, dict[str, object]] = {}
    partial: dict[str, object] = {"environment": environment(device), "copies": copies, "rows": results, "sweep": [],
                                  "launch_config": str(_launch_config())}
    for dtype in [getattr(torch, name) for name in args.dtypes.split(",")]:
        x = torch.randn(args.rows, args.cols, device=device).to(dtype)
        copy_out = torch.empty_like(x)

        def copy_call() -> Tensor:
            return copy_out.copy_(x)

        copy = measure(replayed(copy_call, device) or copy_call, device, args.warmup, args.reps)
        copy_gbps = _fake_quant_bytes(x) / copy.median_ms / 1e6
        copies[str(dtype)] = {"timing": copy, "GBps": copy_gbps}
        for variant in variants(kernel_ops, generator):
            if variant.needs_bf16 and dtype != torch.bfloat16:
                continue
            row: dict[str, object] = {"variant": variant.name, "dtype": str(dtype).removeprefix("torch."),
                                      "shape": [args.rows, args.cols], "copy_ms": copy.median_ms}
            if kernel_ops is not None:
                def kernel_call(variant: Variant = variant) -> object:
                    return variant.kernel(x)

                replay = replayed(kernel_call, device, (generator,))
                row["kernel_timed"] = "eager" if replay is None else "graph replay"
                kernel_t = measure(replay or kernel_call, device, args.warmup, args.reps)
                gbps = variant.bytes_moved(x) / kernel_t.median_ms / 1e6
                row.update(kernel=kernel_t, GBps=gbps, copy_fraction=gbps / copy_gbps)
                if variant.fused_pass is not None:
                    pass_call = variant.fused_pass(x)
                    pass_t = measure(replayed(pass_call, device) or pass_call, device, args.warmup, args.reps)
                    row.update(fused_pass=pass_t, fused_pass_copy_fraction=copy.median_ms / pass_t.median_ms)
            with kernels.disabled():
                row["reference_eager"] = measure(lambda: variant.reference(x), device, args.warmup_ref, args.reps_ref)
                if args.compile and dtype == torch.bfloat16 and variant.name in args.compile_variants.split(","):
                    compiled = torch.compile(variant.reference, backend=args.compile_backend)
                    row["reference_compiled"] = measure(lambda: compiled(x), device, args.warmup_ref, args.reps_ref)
                reference_out = variant.reference(x) if (variant.exact and kernel_ops is not None) else None
            if reference_out is not None:
                row["bit_exact"] = _same(variant.kernel(x), reference_out)
            for key in ("reference_eager", "reference_compiled"):
                if kernel_ops is not None and key in row:
                    row[f"speedup_vs_{key.removeprefix('reference_')}"] = row[key].median_ms / row["kernel"].median_ms
            results.append(row)
            write_json(args.out, partial, quiet=True)  # partial results survive an outer timeout
    if args.sweep and kernel_ops is not None:
        partial["sweep"] = run_sweep(args, device, kernel_ops)
    return partial


def _launch_config():
    from quant.kernels import nvfp4 as nvfp4_kernels

    return nvfp4_kernels._config


def run_sweep(args: argparse.Namespace, device: torch.device, kernel_ops) -> list[dict[str, object]]:
    """Time the main quantization calls under several launch configurations (tile size and warps, the same for the
    amax and the quantize passes): the fake-quantize variants, and the QAT layers' own calls (codes + BF16 GEMM
    operand in one pass: X rowwise, X^T with RHT and SR); then the paired X + RHT(X^T) pass under combinations of its
    two kernels' tiles."""
    from quant.kernels import nvfp4 as nvfp4_kernels

    rows = []
    configs = [nvfp4_kernels.LaunchConfig(elements, max_bk, warps, quantize_elements=elements, quantize_warps=warps,
                                          mx_elements=elements, mx_warps=warps)
               for elements in (2048, 4096, 8192, 16384) for max_bk in (64, 128, 256) for warps in (2, 4, 8)]
    x = torch.randn(args.rows, args.cols, device=device, dtype=torch.bfloat16)
    seed = torch.tensor([1, 0], dtype=torch.int64, device=device)
    cases = {
        "nvfp4 1x16": lambda: kernel_ops.nvfp4_fake_quantize(x),
        "nvfp4 RHT": lambda: kernel_ops.nvfp4_fake_quantize(x, rht=True),
        "nvfp4 16x16": lambda: kernel_ops.nvfp4_fake_quantize(x, tile=(16, 16)),
        "nvfp4 SR": lambda: kernel_ops.nvfp4_fake_quantize(x, stochastic=True, seed=seed),
        "mxfp4 floor": lambda: kernel_ops.mxfp4_fake_quantize(x, "floor"),
        "mxfp4 rceil": lambda: kernel_ops.mxfp4_fake_quantize(x, "rceil"),
        "QAT operand X": lambda: kernel_ops.nvfp4_quantize_scaled(x),
        "QAT operand X^T RHT+SR": lambda: kernel_ops.nvfp4_quantize_scaled(x.t(), rht=True, stochastic=True,
                                                                           seed=seed),
    }
    seeds = torch.tensor([[1, 0], [2, 0]], dtype=torch.int64, device=device)
    pair_cases = {"pair X + RHT(X^T)": lambda: kernel_ops.nvfp4_quantize_pair(x),
                  "pair dY + RHT(dY^T), SR": lambda: kernel_ops.nvfp4_quantize_pair(x, stochastic=True, seeds=seeds)}
    tiles = [(32, 64), (64, 64), (64, 128), (128, 128), (32, 128)]
    pair_configs = [nvfp4_kernels.LaunchConfig(pair_amax_tile=amax_tile, pair_quantize_tile=quantize_tile)
                    for amax_tile in tiles for quantize_tile in tiles]
    for config_list, case_calls in ((configs, cases), (pair_configs, pair_cases)):
        for config in config_list:
            previous = nvfp4_kernels.set_launch_config(config)
            try:
                for name, call in case_calls.items():
                    t = measure(replayed(call, device) or call, device, args.warmup, args.reps)
                    rows.append({"case": name, "config": str(config), "timing": t})
            finally:
                nvfp4_kernels.set_launch_config(previous)
    return rows


def report(result: dict[str, object]) -> str:
    env = result["environment"]
    lines = [f"device: {env.get('gpu', env.get('cpu'))}  torch {env['torch']}  triton {env['triton']}  {env['date']}"]
    for dtype, copy in result["copies"].items():
        lines.append(f"copy {dtype}: {copy['timing'].median_ms:.3f} ms ({copy['GBps']:.0f} GB/s read+write)")
    header = ["variant", "dtype", "kernel ms", "p10-p90", "GB/s", "% copy", "pass ms", "pass % copy", "ref eager",
              "ref compiled", "x eager", "x compiled", "exact", "kernel timed as"]
    rows = []
    for r in result["rows"]:
        k = r.get("kernel")
        rows.append([r["variant"], r["dtype"], _ms(k), k.spread() if k else None,
                     f"{r['GBps']:.0f}" if "GBps" in r else None,
                     f"{100 * r['copy_fraction']:.0f}%" if "copy_fraction" in r else None,
                     _ms(r.get("fused_pass")),
                     f"{100 * r['fused_pass_copy_fraction']:.0f}%" if "fused_pass_copy_fraction" in r else None,
                     _ms(r.get("reference_eager")), _ms(r.get("reference_compiled")),
                     f"{r['speedup_vs_eager']:.1f}" if "speedup_vs_eager" in r else None,
                     f"{r['speedup_vs_compiled']:.1f}" if "speedup_vs_compiled" in r else None,
                     r.get("bit_exact"), r.get("kernel_timed")])
    lines.append(table(header, rows))
    if result["sweep"]:
        lines.append("launch-config sweep (bfloat16):")
        lines.append(table(["case", "config", "ms", "p10-p90"],
                           [[s["case"], s["config"], _ms(s["timing"]), s["timing"].spread()] for s in result["sweep"]]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--warmup-ref", type=int, default=3)
    parser.add_argument("--reps-ref", type=int, default=15)
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile column")
    parser.add_argument("--compile-variants", default=",".join(COMPILED_BY_DEFAULT),
                        help="variants whose reference is also timed under torch.compile (bfloat16 only; each "
                             "compilation takes seconds)")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--sweep", action="store_true", help="also time several kernel launch configurations")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--quick", action="store_true", help="tiny CPU smoke run: 64x128, 2 repetitions")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.cols, args.warmup, args.reps, args.warmup_ref, args.reps_ref = 64, 128, 1, 2, 1, 2
        args.compile_backend, args.dtypes = "eager", "bfloat16"
        torch.set_num_threads(1)
    result = run(args)
    print(report(result))
    write_json(args.out, result)


if __name__ == "__main__":
    main()
