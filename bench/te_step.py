"""Training-step time of a GEMM-bound Llama decoder: BF16 vs Transformer Engine FP8 (each recipe) vs emulated NVFP4.

Why: the TE backend exists for speed (FP8 on Hopper, NVFP4 on Blackwell) and the emulation for fidelity; this puts
their step times side by side, measured in one run on one GPU, so a study can budget its arms. One step is
zero_grad, forward and loss under BF16 autocast (plus ``te.autocast(recipe)`` for TE modes, as
``trainers.precision`` does), backward outside it, and an AdamW step, on a fixed random batch already on the GPU.

The model is ``models.build_model``'s Llama (default d_model 4096, 32 heads, 8 KV heads, SwiGLU 14336, 2 layers,
seq 2048, batch 4: 8192 tokens, so the decoder's GEMMs dominate), built on the GPU with the same seed for every
mode, FP32 master weights; embeddings and lm_head stay BF16 in every mode (the model's high-precision layers).
Modes:

* ``bf16``: plain nn.Linear under BF16 autocast (the baseline of every ratio);
* ``te-bf16``: the TE backend's ``te.Linear`` swaps without ``te.autocast`` (TE's module cost in BF16);
* ``te-fp8-delayed`` / ``te-fp8-current`` / ``te-fp8-block``: ``quant=fp8 quant.backend=te quant.fp8_recipe=...``
  (DelayedScaling, Float8CurrentScaling, Float8BlockScaling; HYBRID formats);
* ``emu-fp8-current``: our emulation of Float8CurrentScaling;
* ``emu-nvfp4-full`` / ``emu-nvfp4-dequantized``: our NVFP4 emulation, TE's recipe with the full NVFP4 backward or
  the dequantized (straight-through) one; on Hopper this is how NVFP4 runs.

Timing (device tool METHOD.md): ``--warmup`` untimed steps, then the median of ``--steps`` steps bracketed by CUDA
events, with the 10th-90th percentile spread (``bench.timing``). Modes TE cannot run here are listed as skipped with
TE's reason. The first step's loss of every mode is printed next to BF16's (same weights and batch), so a broken mode
shows up as a wrong loss rather than a fast time.

Usage (repository root): python -m bench.te_step [--modes bf16,te-fp8-current,...] [--d-model 4096] [--layers 2]
  [--seq 2048] [--batch 4] [--steps 10] [--warmup 3] [--time-limit 240] [--out te_step.json] [--quick]
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import quant
from bench.timing import environment, measure, table, write_json
from conf.schemas.model import LLMConfig
from data.info import DataInfo
from models import build_model
from quant import te_backend

MODES = ("bf16", "te-bf16", "te-fp8-delayed", "te-fp8-current", "te-fp8-block", "emu-fp8-current",
         "emu-nvfp4-full", "emu-nvfp4-dequantized")


@dataclass(frozen=True)
class Mode:
    """How one mode quantizes the model and which TE recipe (if any) its forward runs under."""

    name: str
    backend: str  # "none", "te" or "emulated"
    policy: quant.Policy
    fp8_recipe: str = "current"
    te_autocast: bool = False


def mode(name: str) -> Mode:
    if name == "bf16":
        return Mode(name, "none", quant.Policy())
    if name == "te-bf16":
        return Mode(name, "te", quant.Policy(format="fp8"))
    if name.startswith("te-fp8-"):
        return Mode(name, "te", quant.Policy(format="fp8"), fp8_recipe=name.removeprefix("te-fp8-"), te_autocast=True)
    if name == "emu-fp8-current":
        return Mode(name, "emulated", quant.Policy(format="fp8"))
    if name.startswith("emu-nvfp4-"):
        backward = name.removeprefix("emu-nvfp4-")
        return Mode(name, "emulated", quant.Policy(format="nvfp4", recipe=quant.Recipe(backward=backward)))
    raise SystemExit(f"--modes: unknown mode {name!r}; valid: {', '.join(MODES)}")


def llm_config(args: argparse.Namespace) -> tuple[LLMConfig, DataInfo]:
    cfg = LLMConfig(d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.kv_heads,
                    intermediate_size=args.ffn, max_seq_len=args.seq)
    return cfg, DataInfo(task="lm", vocab_size=args.vocab, seq_len=args.seq, ignore_index=-100)


def build(m: Mode, args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, object | None, int]:
    """The model on ``device`` quantized for mode ``m``; its TE recipe (None without te.autocast); TE layer count."""
    cfg, info = llm_config(args)
    torch.manual_seed(0)
    with device:
        model = build_model(cfg, info)
    if m.backend == "te":
        report = te_backend.apply(model, m.policy, m.fp8_recipe)
        recipe = te_backend.build_recipe(m.policy, m.fp8_recipe) if m.te_autocast else None
        return model, recipe, sum(row.backend == "te" for row in report.rows)
    if m.backend == "emulated":
        quant.apply(model, m.policy)
    return model, None, 0


def make_step(model: nn.Module, recipe: object | None, args: argparse.Namespace, device: torch.device
              ) -> tuple[Callable[[], torch.Tensor], torch.optim.Optimizer]:
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=device, generator=g)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        te_context = te_backend.autocast(recipe) if recipe is not None else contextlib.nullcontext()
        with torch.autocast(device.type, dtype=torch.bfloat16), te_context:
            logits = model(inputs)  # [B, T, V]
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step, optimizer


def run_mode(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, object]:
    m = mode(name)
    row: dict[str, object] = {"mode": name}
    if m.backend == "te":
        available, reason = te_backend.te_support(m.policy, m.fp8_recipe, device.type)
        if not available:
            return {**row, "skipped": reason}
    model, recipe, te_layers = build(m, args, device)
    row.update(te_layers=te_layers, te_recipe=None if recipe is None else repr(recipe),
               quantized_layers=len(quant.quantized_modules(model)) + te_layers)
    step, _ = make_step(model, recipe, args, device)
    begin = time.perf_counter()
    row["first_loss"] = float(step())
    row["first_step_s"] = time.perf_counter() - begin
    row["timing"] = measure(step, device, args.warmup, args.steps, flush=False)
    row["last_loss"] = float(step())
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if m.backend == "emulated" and device.type == "cuda":
        from quant.kernels import checks

        checks.raise_pending(wait=True)  # a NaN/Inf met by a quantizer fails the run here
    del model, step
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return row


def gemm_flops(args: argparse.Namespace) -> float:
    """Multiply-add FLOPs of one step's decoder linears (forward + dgrad + wgrad = 3 GEMMs of 2*M*N*K each)."""
    head = args.d_model // args.heads
    per_layer = args.d_model * (args.d_model + 2 * args.kv_heads * head) + args.d_model * args.d_model
    per_layer += 3 * args.d_model * args.ffn
    return 3 * 2 * args.batch * args.seq * per_layer * args.layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--d-model", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=14336)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--time-limit", type=float, default=240.0, help="seconds; later modes are skipped past it")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--quick", action="store_true", help="a tiny model, 2 steps: a smoke run (CPU or GPU)")
    args = parser.parse_args()
    # Import TE before the first CUDA kernel: once torch has loaded the pip cuDNN, TE's loader picks the system
    # libcudnn_cnn and fails with an undefined symbol (seen on the device image: torch 2.11 + cuDNN 9.19 vs 9.14).
    te_backend.load_te()
    if args.quick:
        args.d_model, args.layers, args.heads, args.kv_heads, args.ffn = 64, 1, 2, 1, 128
        args.vocab, args.seq, args.batch, args.steps, args.warmup = 256, 32, 2, 2, 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = [n for n in args.modes.split(",") if n]
    for name in names:
        mode(name)  # fail on a bad mode name before building anything
    started = time.perf_counter()
    rows = []
    for name in names:
        if time.perf_counter() - started > args.time_limit:
            rows.append({"mode": name, "skipped": f"--time-limit {args.time_limit:.0f} s reached"})
            continue
        rows.append(run_mode(name, args, device))
        print(f"{name}: done after {time.perf_counter() - started:.1f} s", flush=True)
    report(rows, args, device)


def report(rows: list[dict[str, object]], args: argparse.Namespace, device: torch.device) -> None:
    base = next((r["timing"].median_ms for r in rows if r["mode"] == "bf16" and "timing" in r), None)
    base_loss = next((r["first_loss"] for r in rows if r["mode"] == "bf16" and "first_loss" in r), None)
    flops = gemm_flops(args)
    lines = []
    for r in rows:
        if "timing" not in r:
            lines.append([r["mode"], None, None, None, None, None, None, f"skipped: {r['skipped']}"])
            continue
        t = r["timing"]
        ratio = None if base is None else f"{t.median_ms / base:.2f}"
        tflops = f"{flops / (t.median_ms * 1e-3) / 1e12:.0f}"
        loss = f"{r['first_loss']:.4f}" + ("" if base_loss is None else f" ({r['first_loss'] - base_loss:+.4f})")
        mem = f"{r['peak_memory_gib']:.1f}" if "peak_memory_gib" in r else None
        lines.append([r["mode"], f"{t.median_ms:.2f}", t.spread(), ratio, tflops, loss, mem,
                      f"{r['quantized_layers']} quantized layers ({r['te_layers']} on TE)"])
    env = environment(device)
    try:
        import transformer_engine

        env["transformer_engine"] = transformer_engine.__version__
    except Exception as exc:  # noqa: BLE001 - report why TE is missing instead of failing the report
        env["transformer_engine"] = f"not importable: {type(exc).__name__}"
    tokens = args.batch * args.seq
    print(f"\nLlama decoder d_model {args.d_model}, {args.layers} layers, {args.heads} heads ({args.kv_heads} KV), "
          f"SwiGLU {args.ffn}, vocab {args.vocab}; batch {args.batch} x seq {args.seq} = {tokens} tokens; "
          f"{flops / 1e12:.1f} TFLOP of decoder GEMMs per step")
    print(f"{env.get('gpu', env.get('cpu'))}, torch {env['torch']}, TE {env['transformer_engine']}, {env['date']}; "
          f"median of {args.steps} steps after {args.warmup} warm-up steps "
          f"({'CUDA events' if device.type == 'cuda' else 'wall clock'})")
    print(table(["mode", "step ms", "p10-p90", "x bf16", "GEMM TFLOP/s", "first loss (vs bf16)", "peak GiB",
                 "layers"], lines))
    if base_loss is not None and not math.isfinite(base_loss):
        print("warning: the BF16 loss is not finite")
    write_json(args.out, {"environment": env, "args": vars(args), "decoder_gemm_tflop_per_step": flops / 1e12,
                          "results": rows})


if __name__ == "__main__":
    main()
