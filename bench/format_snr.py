"""Quantization error (SNR, dB) of every format in `quant`, side by side on the same tensors, plus fake-quant time.

SNR = 10 log10(sum x^2 / sum (x - dequantize(quantize(x)))^2), computed in float64. Two inputs, both rounded to BF16
so that every format (including NVFP4 with RHT, which needs BF16) sees identical values:
* Gaussian N(0, 1), the case the 4-bit codebooks are designed for;
* Student-t with 3 degrees of freedom, a heavy-tailed stand-in for activations and gradients with outliers.
RHT rows are measured in the original basis (`undo_rht=True`); SR rows are one stochastic draw.
The time column is the best of 7 wall times of `fake_quantize` on a 1024x1024 float32 tensor (BF16 for RHT), on this CPU
with torch's default thread count unless --threads is given.

Usage (from the repository root): python -m bench.format_snr [--rows 2048] [--cols 2048] [--seed 0] [--threads N]
"""

import argparse
import time
from collections.abc import Callable

import torch
from torch import Tensor

from quant import formats, nvfp4

Quantizer = Callable[[Tensor], Tensor]
NF4_DQ_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # 4-bit codes, an 8-bit absmax code per 64, an FP32 scale per 256 absmaxes


def variants() -> list[tuple[str, float, Quantizer]]:
    """(label, bits per element, fake-quantizer) for every format and the options worth comparing."""
    gen = torch.Generator().manual_seed(1234)
    fmt = formats.get

    def nvfp4_sr(x: Tensor) -> Tensor:
        return nvfp4.fake_quantize(x, stochastic=True, generator=gen)

    def nvfp4_rht(x: Tensor) -> Tensor:
        q = nvfp4.quantize(x.to(torch.bfloat16), rht=True)
        return nvfp4.dequantize(q, undo_rht=True)

    return [
        ("nvfp4 1x16", fmt("nvfp4").bits_per_element, lambda x: fmt("nvfp4").fake_quantize(x)),
        ("nvfp4 16x16", fmt("nvfp4").bits_per_element, lambda x: fmt("nvfp4").fake_quantize(x, tile=(16, 16))),
        ("nvfp4 1x16 RHT", fmt("nvfp4").bits_per_element, nvfp4_rht),
        ("nvfp4 1x16 SR", fmt("nvfp4").bits_per_element, nvfp4_sr),
        ("mxfp4 floor", fmt("mxfp4").bits_per_element, lambda x: fmt("mxfp4").fake_quantize(x)),
        ("mxfp4 rceil", fmt("mxfp4").bits_per_element, lambda x: fmt("mxfp4").fake_quantize(x, scale_rule="rceil")),
        ("nf4 b64", fmt("nf4").bits_per_element, lambda x: fmt("nf4").fake_quantize(x)),
        ("nf4 b64 double-quant", NF4_DQ_BITS, lambda x: fmt("nf4").fake_quantize(x, double_quant=True)),
        ("int4 b32", fmt("int4").bits_per_element, lambda x: fmt("int4").fake_quantize(x)),
        ("fp8 e4m3 per-tensor", fmt("fp8_e4m3").bits_per_element, lambda x: fmt("fp8_e4m3").fake_quantize(x)),
        ("fp8 e5m2 per-tensor", fmt("fp8_e5m2").bits_per_element, lambda x: fmt("fp8_e5m2").fake_quantize(x)),
    ]


def snr_db(x: Tensor, y: Tensor) -> float:
    x64, y64 = x.double(), y.double()
    return 10 * torch.log10(x64.pow(2).sum() / (x64 - y64).pow(2).sum()).item()


def best_ms(fn: Quantizer, x: Tensor, repeats: int = 7) -> float:
    """Fastest of `repeats` calls after a warm-up: the least disturbed by other processes on a shared machine."""
    fn(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--cols", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(args.seed)
    shape = (args.rows, args.cols)
    gaussian = torch.randn(shape, generator=g).to(torch.bfloat16).float()
    chi2 = torch.randn((3, *shape), generator=g).pow(2).sum(0)
    student = (torch.randn(shape, generator=g) / (chi2 / 3).sqrt()).to(torch.bfloat16).float()  # Student-t, 3 dof
    timing_input = torch.randn(1024, 1024, generator=g)

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, shape {shape}, seed {args.seed}")
    print(f"{'format':<22} {'bits/elem':>9} {'SNR N(0,1) dB':>14} {'SNR t(3) dB':>12} {'ms 1024^2':>10}")
    for label, bits, fn in variants():
        timed = timing_input.to(torch.bfloat16) if "RHT" in label else timing_input
        print(
            f"{label:<22} {bits:>9.3f} {snr_db(gaussian, fn(gaussian)):>14.2f} {snr_db(student, fn(student)):>12.2f}"
            f" {best_ms(fn, timed):>10.1f}"
        )


if __name__ == "__main__":
    main()
