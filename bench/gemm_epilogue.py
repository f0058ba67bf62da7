"""The QAT GEMM with TE's alpha epilogue: fused Triton GEMM vs cuBLAS FP32 output + epilogue pass vs a BF16 GEMM.

What the emulated NVFP4 forward (and ``full`` dgrad) GEMM costs against the BF16 GEMM of the baseline step, per GEMM
shape (M tokens, N outputs, K inputs; the defaults are the issue-6 decoder's projections), measured side by side:

* ``bf16``: ``torch.mm`` of two BF16 matrices writing BF16 (cuBLAS): what the BF16 baseline runs;
* ``two-pass``: ``torch.mm(..., out_dtype=float32)`` + ``quant.kernels.epilogue`` (alpha, bias, one rounding): the
  fast path before the fused GEMM, and still the fallback for layouts the fused kernel does not take;
* ``fused``: ``kernels.ops.scaled_gemm`` (``quant.kernels.scaled_mm``), the fast path now.

Operands are NVFP4 scaled codes of random BF16 data (a [M, K], the weight [N, K] transposed as the layers pass it),
with a BF16 bias. Each call is timed as a CUDA-graph replay after an L2 flush (median of ``--reps``, 10th-90th
percentile spread); the table gives each time as a multiple of the BF16 GEMM's and says whether the fused output
equals the two-pass output bit for bit. ``--sweep`` also times the fused kernel under other tile configurations.

Usage (repository root, CUDA only): python -m bench.gemm_epilogue [--shapes 8192x1024x1024,...] [--reps 30]
  [--sweep] [--out results.json]
"""
from __future__ import annotations

import argparse

import torch

from bench.timing import environment, measure, replayed, table, write_json
from quant import kernels, nvfp4

DECODER_SHAPES = "8192x1024x1024,8192x2816x1024,8192x1024x2816,8192x3072x1024"
SWEEP_CONFIGS = [(128, 128, 64, 3, 4), (128, 128, 64, 4, 4), (128, 128, 64, 2, 4), (128, 64, 64, 4, 4),
                 (64, 128, 64, 4, 4), (128, 256, 64, 3, 8), (128, 128, 128, 3, 8), (256, 128, 64, 3, 8)]


def _scaled_codes(rows: int, cols: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    q = nvfp4.quantize(torch.randn(rows, cols, device=device, dtype=torch.bfloat16))
    return nvfp4.scaled_codes(q, torch.bfloat16), q.amax


def run(args: argparse.Namespace) -> dict[str, object]:
    from quant.kernels import scaled_mm

    device = torch.device("cuda")
    ops = kernels.load()
    torch.manual_seed(0)
    rows, sweep = [], []

    def timed(fn):
        return measure(replayed(fn, device) or fn, device, args.warmup, args.reps)

    for shape in args.shapes.split(","):
        m, n, k = (int(v) for v in shape.split("x"))
        a, amax_a = _scaled_codes(m, k, device)
        w, amax_b = _scaled_codes(n, k, device)
        b = w.t()
        bias = torch.randn(n, device=device, dtype=torch.bfloat16)

        def two_pass():
            acc = torch.mm(a, b, out_dtype=torch.float32)
            return ops.gemm_epilogue(acc, amax_a, amax_b, bias, 1, torch.bfloat16)

        def fused():
            return ops.scaled_gemm(a, b, amax_a, amax_b, bias, torch.bfloat16)

        bf16 = timed(lambda: torch.mm(a, b))
        row = {"shape": [m, n, k], "bf16": bf16, "two_pass": timed(two_pass), "fused": timed(fused),
               "fused_equals_two_pass": torch.equal(fused().view(torch.int16), two_pass().view(torch.int16)),
               "config": str(scaled_mm._config)}
        rows.append(row)
        if args.sweep:
            for config in SWEEP_CONFIGS:
                previous = scaled_mm.set_config(scaled_mm.GemmConfig(*config))
                try:
                    sweep.append({"shape": [m, n, k], "config": str(scaled_mm._config), "fused": timed(fused),
                                  "bf16": bf16})
                except Exception as error:  # a configuration the device cannot hold (shared memory)
                    sweep.append({"shape": [m, n, k], "config": str(scaled_mm._config), "error": str(error)[:120]})
                finally:
                    scaled_mm.set_config(previous)
        write_json(args.out, {"environment": environment(device), "rows": rows, "sweep": sweep}, quiet=True)
    return {"environment": environment(device), "rows": rows, "sweep": sweep}


def report(result: dict[str, object]) -> str:
    env = result["environment"]
    lines = [f"device: {env.get('gpu')}  torch {env['torch']}  triton {env['triton']}  {env['date']}"]
    header = ["M x N x K", "bf16 ms", "TFLOP/s", "two-pass ms", "x bf16", "fused ms", "x bf16", "p10-p90 fused",
              "fused == two-pass"]
    body = []
    for r in result["rows"]:
        m, n, k = r["shape"]
        bf16, two, fused = r["bf16"].median_ms, r["two_pass"].median_ms, r["fused"].median_ms
        body.append([f"{m}x{n}x{k}", f"{bf16:.3f}", f"{2 * m * n * k / bf16 / 1e9:.0f}", f"{two:.3f}",
                     f"{two / bf16:.2f}", f"{fused:.3f}", f"{fused / bf16:.2f}", r["fused"].spread(),
                     r["fused_equals_two_pass"]])
    lines.append(table(header, body))
    if result["sweep"]:
        lines.append("fused kernel, tile configurations:")
        lines.append(table(["M x N x K", "config", "ms", "x bf16"],
                           [["x".join(map(str, s["shape"])), s["config"],
                             f"{s['fused'].median_ms:.3f}" if "fused" in s else s["error"],
                             f"{s['fused'].median_ms / s['bf16'].median_ms:.2f}" if "fused" in s else ""]
                            for s in result["sweep"]]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=DECODER_SHAPES, help="comma list of MxNxK")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--sweep", action="store_true", help="also time other tile configurations")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device (the fused GEMM and cuBLAS are what is measured)")
    result = run(args)
    print(report(result))
    write_json(args.out, result)


if __name__ == "__main__":
    main()
