"""Host (CPU) time per quantized-layer call and per quantization: is a training step bound by Python and launches?

Why: on an H100 a decoder step with emulated NVFP4 ran at 2-3x its GPU busy time (``bench.train_step --profile``), so
the host, not the kernels, set the pace. This bench measures the host side alone, on tensors small enough that the
GPU always waits for the host: the time to *issue* one quantization, one fake-quantize, and one quantized Linear's
forward + backward, next to the same for ``torch.add`` and ``nn.Linear``. ``--cprofile MODE`` prints where a
quantized layer's host time goes (Python functions by own time).

    python -m bench.host_overhead --out host_overhead.json
    python -m bench.host_overhead --cprofile full
    python -m bench.host_overhead --quick       # smoke run (CPU: the reference path)
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time
from typing import Callable

import torch
from torch import nn

import quant
from bench.timing import environment, table, write_json
from quant import kernels, nvfp4

MODES = ("dequantized", "full", "high_precision")


def host_us(fn: Callable[[], object], device: torch.device, calls: int, repeats: int = 5) -> float:
    """Median over ``repeats`` of the host time per call of ``calls`` back-to-back calls (no synchronisation inside
    the timed loop; the device is drained before each repeat so the launch queue starts empty)."""
    per_call = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        begin = time.perf_counter()
        for _ in range(calls):
            fn()
        per_call.append((time.perf_counter() - begin) / calls * 1e6)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return statistics.median(per_call)


def layer_stack(mode: str | None, width: int, depth: int, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(depth)]).to(device)
    if mode is not None:
        quant.apply(model, quant.Policy(format="nvfp4", recipe=quant.Recipe(backward=mode)))
        for layer in quant.quantized_modules(model).values():
            layer.quantizer.prime(device)
    return model


def train_call(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def call() -> None:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            y = model(x)
        y.float().sum().backward()

    return call


def run(args: argparse.Namespace) -> dict[str, object]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x = torch.randn(args.tokens, args.width, device=device, dtype=torch.bfloat16)
    rows: list[dict[str, object]] = []

    def add(name: str, fn: Callable[[], object], per: int = 1) -> None:
        fn()  # compile / allocate once
        rows.append({"what": name, "host_us": host_us(fn, device, args.calls) / per})
        print(f"... {name}: {rows[-1]['host_us']:.1f} us", flush=True)

    add("torch.add (one launch)", lambda: torch.add(x, x))
    add("nvfp4.fake_quantize 1x16", lambda: nvfp4.fake_quantize(x))
    add("nvfp4.quantize 1x16", lambda: nvfp4.quantize(x))
    add("nvfp4.fake_quantize RHT+SR", lambda: nvfp4.fake_quantize(x, rht=True, stochastic=True))
    inputs = torch.randn(args.tokens, args.width, device=device, requires_grad=True)
    plain = layer_stack(None, args.width, args.depth, device)
    add(f"nn.Linear fwd+bwd (per layer of {args.depth})", train_call(plain, inputs), per=args.depth)
    for mode in MODES:
        model = layer_stack(mode, args.width, args.depth, device)
        add(f"quantized Linear {mode} fwd+bwd (per layer)", train_call(model, inputs), per=args.depth)
    result: dict[str, object] = {"environment": environment(device), "kernels": kernels.unavailable_reason() is None
                                 and device.type == "cuda", "rows": rows, "settings": dict(vars(args))}
    if args.cprofile:
        model = layer_stack(args.cprofile, args.width, args.depth, device)
        call = train_call(model, inputs)
        call()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.calls):
            call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(args.cprofile_top)
        result["cprofile"] = text.getvalue()
    return result


def report(result: dict[str, object]) -> str:
    env = result["environment"]
    lines = [f"device: {env.get('gpu', env.get('cpu'))}  torch {env['torch']}  triton {env['triton']}  {env['date']}"
             f"  kernels: {result['kernels']}"]
    lines.append(table(["host time per call", "us"], [[r["what"], f"{r['host_us']:.1f}"] for r in result["rows"]]))
    if "cprofile" in result:
        lines.append(result["cprofile"])
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=8, help="layers per stack (times are per layer)")
    parser.add_argument("--calls", type=int, default=200, help="calls per timed repeat")
    parser.add_argument("--cprofile", choices=MODES, help="also profile the quantized stack of this backward mode")
    parser.add_argument("--cprofile-top", type=int, default=30)
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 layers, 3 calls per repeat, cProfile full")
    args = parser.parse_args()
    if args.quick:
        args.depth, args.calls, args.cprofile, args.cprofile_top = 2, 3, args.cprofile or "full", 5
    result = run(args)
    print(report(result))
    write_json(args.out, result)


if __name__ == "__main__":
    main()
