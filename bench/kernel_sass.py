"""Instruction mix of the NVFP4 quantize pass, compiled for Hopper (sm_90) on any machine: no GPU needed.

Why: the quantize passes are bound by instruction issue, chiefly the SM's ALU pipe (compares, selects, min/max, logic,
shifts), not by memory (docs/kernels.md, "Bit-exactness"). Device time is scarce, while Triton compiles a kernel for
a named target anywhere and its wheel carries ``ptxas``, ``nvdisasm`` and ``cuobjdump``. This script compiles
``quant.kernels.nvfp4._quantize_kernel`` for each variant with the launch configuration the library uses, and prints
per variant: SASS instructions, instructions per element of the program's tile, registers, and the count per opcode
class. The classes group opcodes by the unit that usually executes them on Hopper (an approximation from NVIDIA's
public descriptions, not a hardware measurement): ``alu`` (FSETP, FSEL, SEL, FMNMX, VIMNMX, LOP3, SHF, PRMT, ISETP,
IADD3, LEA), ``fma`` (FADD, FMUL, FFMA, IMAD, HFMA2, VIADD), ``conversion`` (I2F, F2I, F2F, FRND, MUFU), ``memory``
(loads, stores, atomics, shuffles), ``other``. The code of branches a clean tensor never takes (the poisoned store,
the division's slow path) is counted too.

Usage (repository root): python -m bench.kernel_sass [--variants 1x16,SR,RHT,RHT+SR,16x16] [--dtype bfloat16]
  [--rows 8192 --cols 4096] [--out results.json]
"""
from __future__ import annotations

import argparse
import collections
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from bench.timing import table, write_json
from quant.kernels import nvfp4 as nvfp4_kernels
from quant.nvfp4 import BLOCK, E2M1_X_E4M3, INV_2688, INV_6

VARIANTS = {  # name -> the kernel's variant constexprs (a fake-quantize: values in the input dtype, no codes)
    "1x16": {},
    "16x16": {"TILE_ROWS": 16},
    "SR": {"STOCHASTIC": True},
    "RHT": {"RHT": True},
    "RHT+SR": {"RHT": True, "STOCHASTIC": True},
}
OPCODE_CLASSES = {
    "alu": {"FSETP", "FSEL", "SEL", "FMNMX", "VIMNMX", "IMNMX", "LOP3", "SHF", "PRMT", "ISETP", "IADD3", "LEA", "IABS"},
    "fma": {"FADD", "FMUL", "FFMA", "IMAD", "HFMA2", "VIADD"},
    "conversion": {"I2F", "F2I", "F2F", "FRND", "MUFU", "I2FP", "F2IP"},
    "memory": {"LDG", "STG", "LDS", "STS", "LDSM", "LDGSTS", "ATOMG", "RED", "SHFL", "LDC"},
}
_INSTRUCTION = re.compile(r"^\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)")


@dataclass(frozen=True)
class SassCount:
    instructions: int
    elements_per_thread: float
    registers: int
    by_class: dict[str, int]
    by_opcode: dict[str, int]


def _tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def compile_quantize_pass(variant: str, dtype: torch.dtype, rows: int, cols: int) -> tuple[bytes, float]:
    """(cubin, elements per thread) of the fake-quantize pass for an [rows, cols] contiguous input of ``dtype``,
    compiled for sm_90 with the library's launch options and tile (``nvfp4_kernels.quantize_launch``)."""
    kernel = nvfp4_kernels._quantize_kernel
    bm, bk, options = nvfp4_kernels.quantize_launch(rows, triton.cdiv(cols, BLOCK) * BLOCK, torch.empty(0))
    bf16 = dtype == torch.bfloat16
    values = "*i16" if bf16 else "*fp32"
    pointers = {"x_ptr": "*bf16" if bf16 else "*fp32", "amax_ptr": "*fp32", "seed_ptr": "*i64", "out_ptr": values,
                "codes_ptr": "*u8", "scales_ptr": "*u8", "dequantized_ptr": values}
    constants = {"stride_k": 1, "TILE_ROWS": 1, "RHT": False, "STOCHASTIC": False, "WRITE_CODES": False,
                 "WRITE_VALUES": True, "SCALED_VALUES": False, "WRITE_DEQUANTIZED": False,
                 "SIGN_MASK": nvfp4_kernels.SIGN_MASK, "INV_6": INV_6, "INV_2688": INV_2688,
                 "E2M1_X_E4M3": E2M1_X_E4M3, "FLT_MAX": nvfp4_kernels.FLT_MAX, "OUT_BF16_BITS": bf16,
                 "DEQUANTIZED_BF16_BITS": False, "NATIVE_BF16": True, "BM": bm, "BK": bk, **VARIANTS[variant]}
    signature = {name: "constexpr" if name in constants else pointers.get(name, "i32") for name in kernel.arg_names}
    aligned = [name for name in kernel.arg_names if name in pointers or name in ("stride_m", "K", "KP")]
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    compiled = triton.compile(ASTSource(kernel, signature, constants, attrs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": options["num_warps"], "enable_fp_fusion": False})
    return compiled.asm["cubin"], bm * bk / (32 * options["num_warps"])


def count(cubin: bytes, elements_per_thread: float) -> SassCount:
    """Disassemble a cubin (``nvdisasm``, ``cuobjdump -res-usage``) and count its instructions by opcode and class."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        sass = subprocess.run([_tool("nvdisasm"), "-c", file.name], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", file.name], capture_output=True, text=True,
                               check=True).stdout
    opcodes = collections.Counter(match.group(1) for line in sass.splitlines()
                                  if (match := _INSTRUCTION.match(line)) is not None)
    by_class = collections.Counter()
    for opcode, n in opcodes.items():
        by_class[next((c for c, members in OPCODE_CLASSES.items() if opcode in members), "other")] += n
    registers = re.search(r"REG:(\d+)", usage)
    total = sum(opcodes.values())
    return SassCount(total, elements_per_thread, int(registers.group(1)) if registers else -1,
                     dict(by_class), dict(opcodes.most_common()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--out", help="write the counts as JSON here")
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; valid: {list(VARIANTS)}")
    dtype = getattr(torch, args.dtype)
    if dtype != torch.bfloat16 and any(VARIANTS[name].get("RHT") for name in names):
        parser.error("the RHT variants need --dtype bfloat16")
    counts = {name: count(*compile_quantize_pass(name, dtype, args.rows, args.cols)) for name in names}
    classes = list(OPCODE_CLASSES) + ["other"]
    rows = [[name, c.instructions, f"{c.instructions / c.elements_per_thread:.1f}", c.registers,
             *[c.by_class.get(k, 0) for k in classes]] for name, c in counts.items()]
    print(f"NVFP4 fake-quantize pass, {args.dtype} [{args.rows}, {args.cols}], sm_90, Triton {triton.__version__}")
    print(table(["variant", "SASS", "per element", "registers", *classes], rows))
    write_json(args.out, {"triton": triton.__version__, "dtype": args.dtype, "shape": [args.rows, args.cols],
                          "variants": {name: asdict(c) for name, c in counts.items()}})


if __name__ == "__main__":
    main()
