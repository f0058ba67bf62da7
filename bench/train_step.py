"""Training-step time of the shipped models, BF16 against each emulated NVFP4 mode, eager and with compiled blocks.

What is measured: one optimizer step (zero_grad, BF16-autocast forward, loss, backward, AdamW step) on a fixed random
batch already on the device, for models built by ``models.build_model`` from the schema dataclasses and quantized by
``quant.apply`` (so the numbers are the shipped code's, including the Triton kernels on CUDA):

* ``decoder``: the 12-layer Llama decoder of issue 6, d_model 1024, 16 heads, SwiGLU 2816, seq 1024, batch 8;
* ``resnet50``: torchvision ResNet-50, 224x224, 1000 classes, batch 32;
* ``unet``: the GroupNorm UNet with the query mask head (default width), 256x256, 81 classes, batch 16.

Modes: ``bf16`` (no quantization) and ``nvfp4-<backward>`` for ``dequantized``, ``full`` and ``high_precision``
(``quant.Recipe.backward``; TE's default recipe otherwise: 16x16 weights, SR on dY, RHT on the wgrad operands; the
model's own high-precision layers, e.g. embeddings and stems, stay BF16); the peer row ``torchao-nvfp4-dequantized``
(``bench/torchao_nvfp4.py``: torchao's NVFP4 quantize/dequantize on the same Linear layers, dequantized backward;
decoder only, skipped with the reason where torchao is absent or the model quantizes convolutions). A ``+tf32``
suffix runs a mode with TF32 matmuls allowed: a what-if for ``quant.gemm``, whose FP32 operands are all BF16-exact
under BF16 autocast, so TF32 changes only the accumulation. Each mode runs in the ``--compile`` settings:
``eager``; ``blocks``, each block (``quant.find_blocks``) compiled by ``torch.compile`` (for ``--compile-models``);
``graph``, the whole step captured in one CUDA graph and replayed (``graphed``: an eager NVFP4 step is bound by the
host's Python and launches, a replay is not); ``blocks+graph``, both. Times are medians of CUDA-event timings over
``--steps`` steps after ``--warmup`` steps (compilation happens in the first step), with the 10th-90th percentile
spread; ratios are against the BF16 step of the same compile setting, measured in the same run. Models run in the
order given, eager rows before compiled ones; ``--time-limit`` skips what is left once exceeded.

Compiled rows also report how many graphs Dynamo compiled and how many graph breaks it met over all their steps
(``graphs/breaks``): blocks of one shape must share their graphs (no per-layer recompiles). The layers'
stochastic-rounding states are created before compilation (``LayerQuantizer.prime``).
``--check-graph-breaks`` prints ``torch._dynamo.explain`` of the first quantized block's forward (graphs, breaks and
their reasons); ``--profile`` compares wall and GPU busy time over a few eager steps of one model/mode and lists the
top kernels and CPU operators; ``--quick`` is a tiny
CPU smoke run (2 steps, compile with the eager backend). Imports ``models`` (hence omegaconf and hydra-core, for the
config schemas) and ``transformers`` (decoder).

Usage (repository root): python -m bench.train_step [--models decoder,resnet50,unet] [--modes bf16,nvfp4-full,...]
  [--compile eager,graph,blocks,blocks+graph] [--compile-models decoder] [--steps 10] [--time-limit 300]
  [--check-graph-breaks [decoder]]
  [--profile decoder:nvfp4-full]
  [--out results.json] [--quick]
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._dynamo.utils import counters as dynamo_counters

import quant
from bench import torchao_nvfp4
from bench.timing import Timing, capture, environment, measure, table, write_json
from conf.schemas.model import LLMConfig, ResNetConfig, UNetConfig
from data.info import DataInfo
from models import build_model

MODES = ("bf16", "nvfp4-dequantized", "nvfp4-full", "nvfp4-high_precision", torchao_nvfp4.MODE)
TF32_SUFFIX = "+tf32"  # e.g. nvfp4-full+tf32: the same step with TF32 matmuls allowed (what-if for quant.gemm)
COMPILE_SETTINGS = ("eager", "blocks", "graph", "blocks+graph")


@dataclass(frozen=True)
class Workload:
    """A model config, the data facts it is built for, and a batch maker + loss for one step."""

    name: str
    config: object
    info: DataInfo
    batch: Callable[[torch.device], tuple[Tensor, Tensor]]  # (input, target)
    loss: Callable[[object, Tensor], Tensor]


def _images(batch: int, size: int, classes: int, dense: bool):
    def make(device: torch.device) -> tuple[Tensor, Tensor]:
        g = torch.Generator(device=device).manual_seed(0)
        images = torch.randn(batch, 3, size, size, device=device, generator=g)
        shape = (batch, size, size) if dense else (batch,)
        return images, torch.randint(0, classes, shape, device=device, generator=g)

    return make


def _tokens(batch: int, seq: int, vocab: int):
    def make(device: torch.device) -> tuple[Tensor, Tensor]:
        g = torch.Generator(device=device).manual_seed(0)
        ids = torch.randint(0, vocab, (batch, seq + 1), device=device, generator=g)
        return ids[:, :-1], ids[:, 1:]

    return make


def _segmentation_loss(out: dict, target: Tensor) -> Tensor:
    """Semantic CE plus a small term on each instance output, so every head is in the backward pass."""
    loss = F.cross_entropy(out["semantic"].float(), target)
    if "instance" in out:
        loss = loss + 1e-3 * sum(v.float().pow(2).mean() for v in out["instance"].values())
    return loss


def _lm_loss(logits: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), target.flatten())


def workloads(quick: bool) -> dict[str, Workload]:
    if quick:
        return {
            "decoder": Workload("decoder", LLMConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2,
                                                     intermediate_size=64, max_seq_len=16),
                                DataInfo(task="lm", vocab_size=64, seq_len=16, ignore_index=-100),
                                _tokens(1, 16, 64), _lm_loss),
            "resnet50": Workload("resnet50", ResNetConfig(arch="resnet18", small_stem=True),
                                 DataInfo(task="classification", num_classes=10, image_size=(8, 8)),
                                 _images(2, 8, 10, dense=False), lambda out, t: F.cross_entropy(out.float(), t)),
            "unet": Workload("unet", UNetConfig(depth=2, num_queries=4, query_dim=16),
                             DataInfo(task="segmentation", num_classes=5, image_size=(16, 16), instances=True),
                             _images(1, 16, 5, dense=True), _segmentation_loss),
        }
    return {
        "decoder": Workload("decoder", LLMConfig(d_model=1024, n_layers=12, n_heads=16, n_kv_heads=16,
                                                 intermediate_size=2816, max_seq_len=1024),
                            DataInfo(task="lm", vocab_size=50304, seq_len=1024, ignore_index=-100),
                            _tokens(8, 1024, 50304), _lm_loss),
        "resnet50": Workload("resnet50", ResNetConfig(arch="resnet50", small_stem=False),
                             DataInfo(task="classification", num_classes=1000, image_size=(224, 224)),
                             _images(32, 224, 1000, dense=False), lambda out, t: F.cross_entropy(out.float(), t)),
        "unet": Workload("unet", UNetConfig(),
                         DataInfo(task="segmentation", num_classes=81, image_size=(256, 256), instances=True),
                         _images(16, 256, 81, dense=True), _segmentation_loss),
    }


def build(work: Workload, mode: str, device: torch.device, channels_last: bool = False
          ) -> tuple[nn.Module, tuple[str, ...] | None, tuple[str, ...]]:
    """The model on ``device``, quantized for ``mode``; the names of its quantized layers (None for BF16); its block
    names (found before the swap: ``quant.find_blocks`` auto-detects blocks by their plain nn GEMM layers).
    ``channels_last``: 4-D weights in channels-last memory order (``--channels-last``)."""
    torch.manual_seed(0)
    model = build_model(work.config, work.info).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    blocks = quant.find_blocks(model)
    if mode == "bf16":
        return model, None, blocks
    if mode.removesuffix(TF32_SUFFIX) == torchao_nvfp4.MODE:
        return model, torchao_nvfp4.apply(model), blocks
    backward = mode.removesuffix(TF32_SUFFIX).removeprefix("nvfp4-")
    report = quant.apply(model, quant.Policy(format="nvfp4", recipe=quant.Recipe(backward=backward)))
    return model, tuple(report.quantized_names()), blocks


def prime_sr_states(model: nn.Module, device: torch.device) -> None:
    """Create each quantized layer's stochastic-rounding state on ``device`` before anything is compiled (otherwise
    the first compiled call of each layer takes one graph break to create it; later calls never do)."""
    for layer in quant.quantized_modules(model).values():
        layer.quantizer.prime(device)


def compile_blocks(model: nn.Module, blocks: tuple[str, ...], backend: str) -> int:
    """torch.compile each block of the model in place (the issue's "compiled blocks" setting); returns their count."""
    modules = dict(model.named_modules())
    for name in blocks:
        modules[name].compile(backend=backend)
    return len(blocks)


def make_step(model: nn.Module, work: Workload, device: torch.device, for_graph: bool = False,
              channels_last: bool = False) -> Callable[[], Tensor]:
    """One training step on a fixed batch. ``for_graph``: written to be captured in a CUDA graph (AdamW keeps its
    step counts on the device, autocast caches no weight casts across the capture). ``channels_last``: image batches
    in channels-last memory order."""
    inputs, target = work.batch(device)
    if channels_last and inputs.dim() == 4:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, capturable=for_graph)

    def step() -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=not for_graph):
            out = model(inputs)
        loss = work.loss(out, target)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


@contextlib.contextmanager
def _capture_code_paths() -> Iterator[None]:
    """Inside this block transformers takes the branches it takes while a CUDA stream captures.

    Why: transformers builds the decoder's attention mask differently during a capture (``is_tracing`` counts
    ``torch.cuda.is_current_stream_capturing()``: an explicit mask instead of SDPA's causal flag). Compiled blocks
    that first saw the other inputs during the capture would recompile there, and compiling inside a capture fails
    (Inductor reads values to the host). Warming up on the capture's branches compiles them before the capture."""
    utils = sys.modules.get("transformers.utils.import_utils")
    if utils is None or not hasattr(utils, "is_cuda_stream_capturing"):
        yield
        return
    original, utils.is_cuda_stream_capturing = utils.is_cuda_stream_capturing, lambda: True
    try:
        yield
    finally:
        utils.is_cuda_stream_capturing = original


def graphed(step: Callable[[], Tensor], device: torch.device, warmup: int = 3, error_mode: str = "global"
            ) -> Callable[[], Tensor]:
    """``step`` captured in one CUDA graph (forward, backward, optimizer): each call replays it, so the host issues
    one launch per step instead of thousands (a step of these models is otherwise bound by Python and launch
    overhead). Warm-up steps run on a side stream first, as capture requires; the SR counters advance on every
    replay (``quant.functional``) and the NaN/Inf flag is written by every replay (``checks.raise_pending``).
    ``error_mode``: ``torch.cuda.graph``'s capture_error_mode ("thread_local" lets other threads, e.g. the autograd
    engine's, make capture-unsafe CUDA calls that are not part of the step)."""
    graph, loss = capture(step, device, warmup, error_mode=error_mode, warmup_context=_capture_code_paths)

    def replay() -> Tensor:
        graph.replay()
        return loss

    return replay


def time_config(work: Workload, mode: str, setting: str, args: argparse.Namespace, device: torch.device
                ) -> dict[str, object]:
    compiled, graph = setting.startswith("blocks"), setting.endswith("graph")
    if graph and device.type != "cuda":
        raise RuntimeError(f"--compile {setting} captures CUDA graphs: it needs a CUDA device")
    model, quantized, blocks = build(work, mode, device, args.channels_last)
    row: dict[str, object] = {"model": work.name, "mode": mode, "compile": setting,
                              "quantized_layers": None if quantized is None else len(quantized)}
    prime_sr_states(model, device)
    if compiled:
        row["compiled_blocks"] = compile_blocks(model, blocks, args.compile_backend)
    step = make_step(model, work, device, for_graph=graph, channels_last=args.channels_last)
    dynamo_counters.clear()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = mode.endswith(TF32_SUFFIX)
    try:
        begin = time.perf_counter()
        row["first_loss"] = float(step())  # first step: compilation, lazy generator creation; same weights and batch
        row["first_step_s"] = time.perf_counter() - begin
        if graph:
            step = graphed(step, device, error_mode="thread_local" if compiled else "global")
        row["timing"] = measure(step, device, args.warmup, args.steps, flush=False)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    if compiled:  # over all steps: a per-layer recompile or a graph break would show here
        row["dynamo_graphs"] = dynamo_counters["stats"]["unique_graphs"]
        row["dynamo_graph_breaks"] = sum(dynamo_counters["graph_break"].values())
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if mode != "bf16":
        from quant.kernels import checks

        checks.raise_pending()  # a NaN/Inf in any quantized tensor fails the run here
    del model, step
    _release(device)
    return row


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch._dynamo.reset()


def graph_breaks(work: Workload, mode: str, device: torch.device) -> dict[str, object]:
    """``torch._dynamo.explain`` of the first block that holds a quantized layer, forward under BF16 autocast."""
    try:
        model, quantized_names, blocks = build(work, mode, device)
    except (ImportError, ValueError) as error:  # a peer row that cannot serve this model: said, as in the timing rows
        return {"model": work.name, "mode": mode, "block": None, "error": str(error).splitlines()[0][:300]}
    prime_sr_states(model, device)
    modules = dict(model.named_modules())
    quantized = set(quantized_names or ())
    block_name = next((b for b in blocks if any(q.startswith(f"{b}.") for q in quantized)), None)
    if block_name is None:
        return {"model": work.name, "mode": mode, "block": None}
    block = modules[block_name]
    captured: dict[str, tuple] = {}
    hook = block.register_forward_pre_hook(lambda m, a, kw: captured.setdefault("in", (a, kw)), with_kwargs=True)
    inputs, _ = work.batch(device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        model(inputs)
    hook.remove()
    block_args, block_kwargs = captured["in"]

    def forward(*a, **kw):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return block(*a, **kw)

    try:
        explanation = torch._dynamo.explain(forward)(*block_args, **block_kwargs)
    except Exception as error:  # noqa: BLE001 - e.g. an internal Dynamo error is the finding
        result = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
    else:
        reasons = Counter(str(r.reason).splitlines()[0][:200] for r in explanation.break_reasons)
        result = {"graphs": explanation.graph_count, "graph_breaks": explanation.graph_break_count,
                  "reasons": dict(reasons)}
    del model
    _release(device)
    return {"model": work.name, "mode": mode, "block": block_name, **result}


def profile(work: Workload, mode: str, device: torch.device, steps: int = 3) -> dict[str, object]:
    """Where a step's time goes, over a few eager steps of one model/mode: wall time, the GPU's busy time (the sum of
    its kernel and copy durations; one stream) and the top kernels by device time and CPU operators by self CPU
    time. A busy time well below the wall time means the step is bound by the host (Python and launches), not by the
    kernels."""
    model, _, _ = build(work, mode, device)
    step = make_step(model, work, device)
    for _ in range(2):
        step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize(device)
    with torch.profiler.profile(activities=activities) as prof:
        begin = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall_s = time.perf_counter() - begin
    averages = prof.key_averages()
    on_device = [e for e in averages if e.device_type == torch.autograd.DeviceType.CUDA]
    del model, step
    _release(device)
    return {
        "wall_ms_per_step": wall_s * 1e3 / steps,  # with the profiler's own host overhead
        "gpu_busy_ms_per_step": sum(e.self_device_time_total for e in on_device) / 1e3 / steps,
        "kernel_launches_per_step": sum(e.count for e in on_device) / steps,
        "kernels": _top(on_device, "self_device_time_total", steps),
        "cpu_ops": _top(averages, "self_cpu_time_total", steps),
    }


def _top(events: list, time_attribute: str, steps: int, count: int = 20) -> list[dict[str, object]]:
    """The ``count`` profiler events with the most ``time_attribute`` (microseconds), per step."""
    ranked = sorted(events, key=lambda e: getattr(e, time_attribute), reverse=True)[:count]
    return [{"name": e.key[:90], "calls": e.count / steps, "ms_per_step": getattr(e, time_attribute) / 1e3 / steps}
            for e in ranked]


def run(args: argparse.Namespace) -> dict[str, object]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    works = workloads(args.quick)
    deadline = time.perf_counter() + args.time_limit
    rows: list[dict[str, object]] = []
    result: dict[str, object] = {"environment": environment(device), "rows": rows, "settings": dict(vars(args))}
    diagnose(result, args, works, device)
    compiled_models = args.models.split(",") if args.compile_models == "all" else args.compile_models.split(",")
    for name in args.models.split(","):  # model by model, in the order given: a time limit cuts the last ones
        for setting in args.compile.split(","):
            if setting.startswith("blocks") and name not in compiled_models:
                continue
            for mode in args.modes.split(","):
                if time.perf_counter() > deadline:
                    rows.append({"model": name, "mode": mode, "compile": setting, "skipped": "time limit"})
                    continue
                print(f"... {name} {mode} {setting}", flush=True)
                try:
                    rows.append(time_config(works[name], mode, setting, args, device))
                except Exception as error:  # noqa: BLE001 - a failing configuration is a result, not the end of the run
                    traceback.print_exc()  # the whole chain in the log; the row keeps the last error's first line
                    rows.append({"model": name, "mode": mode, "compile": setting,
                                 "skipped": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"})
                    _release(device)
                _add_ratios(rows)
                write_json(args.out, result, quiet=True)  # partial results survive an outer timeout
    return result


def diagnose(result: dict[str, object], args: argparse.Namespace, works: dict[str, Workload],
             device: torch.device) -> None:
    """The graph-break check and the profiles, first (a time limit cuts timing rows, not these)."""
    if args.check_graph_breaks:
        names = args.models.split(",") if args.check_graph_breaks == "all" else args.check_graph_breaks.split(",")
        result["graph_breaks"] = [graph_breaks(works[name], mode, device) for name in names
                                  for mode in args.modes.split(",") if mode != "bf16"]
        write_json(args.out, result, quiet=True)
    if args.profile:
        result["profile"] = {}
        for spec in args.profile.split(","):
            name, mode = spec.split(":")
            result["profile"][spec] = profile(works[name], mode, device)


def _add_ratios(rows: list[dict[str, object]]) -> None:
    """Each row's time against the BF16 step of the same setting, of BF16 eager, and of BF16 with compiled blocks
    (issue 6's baseline), all of the same model and run."""
    base = {(r["model"], r["compile"]): r["timing"].median_ms for r in rows
            if r.get("mode") == "bf16" and "timing" in r}
    for r in rows:
        if "timing" not in r:
            continue
        for key, setting in (("ratio_vs_bf16_same_compile", r["compile"]), ("ratio_vs_bf16_eager", "eager"),
                             ("ratio_vs_bf16_blocks", "blocks")):
            if (r["model"], setting) in base:
                r[key] = r["timing"].median_ms / base[(r["model"], setting)]


def report(result: dict[str, object]) -> str:
    env = result["environment"]
    lines = [f"device: {env.get('gpu', env.get('cpu'))}  torch {env['torch']}  triton {env['triton']}  {env['date']}"]
    header = ["model", "mode", "compile", "ms/step", "p10-p90", "vs bf16 (same)", "vs bf16 eager",
              "vs bf16 blocks", "1st step s", "1st loss", "peak GiB", "quantized", "graphs/breaks"]
    rows = []
    for r in result["rows"]:
        if "skipped" in r:
            rows.append([r["model"], r["mode"], r["compile"], f"skipped: {r['skipped']}"] + [None] * 9)
            continue
        t: Timing = r["timing"]
        rows.append([r["model"], r["mode"], r["compile"], f"{t.median_ms:.2f}", t.spread(),
                     _fmt(r.get("ratio_vs_bf16_same_compile"), "{:.2f}x"),
                     _fmt(r.get("ratio_vs_bf16_eager"), "{:.2f}x"), _fmt(r.get("ratio_vs_bf16_blocks"), "{:.2f}x"),
                     f"{r['first_step_s']:.1f}", f"{r['first_loss']:.4f}", _fmt(r.get("peak_memory_gib"), "{:.1f}"),
                     r["quantized_layers"],
                     f"{r['dynamo_graphs']}/{r['dynamo_graph_breaks']}" if "dynamo_graphs" in r else None])
    lines.append(table(header, rows))
    for g in result.get("graph_breaks", []):
        lines.append(f"graph breaks {g['model']} {g['mode']} block {g['block']}: graphs={g.get('graphs')} "
                     f"breaks={g.get('graph_breaks')}" + (f" error: {g['error']}" if "error" in g else ""))
        lines += [f"    {count}x {reason}" for reason, count in g.get("reasons", {}).items()]
    for spec, p in result.get("profile", {}).items():
        lines.append(f"profile {spec}: wall {p['wall_ms_per_step']:.1f} ms/step (profiled), GPU busy "
                     f"{p['gpu_busy_ms_per_step']:.1f} ms/step, {p['kernel_launches_per_step']:.0f} kernels/step")
        for title, key in (("top kernels (device time)", "kernels"), ("top CPU operators (self CPU time)", "cpu_ops")):
            lines.append(f"  {title}:")
            lines.append(table(["name", "calls/step", "ms/step"],
                               [[k["name"], f"{k['calls']:.0f}", f"{k['ms_per_step']:.3f}"] for k in p[key][:15]]))
    return "\n".join(lines)


def _fmt(value: object, pattern: str) -> str | None:
    return None if value is None else pattern.format(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None, help="default: decoder,resnet50,unet (--quick: decoder)")
    parser.add_argument("--modes", default=None, help=f"default: {','.join(MODES)} (--quick: bf16,nvfp4-full)")
    parser.add_argument("--compile", default="eager,blocks",
                        help=f"comma list of {', '.join(COMPILE_SETTINGS)} (+graph: the whole step in a CUDA graph)")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--compile-models", default="all", help="models that also get the compiled rows")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after the first (compiling) step")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--time-limit", type=float, default=1e9, help="seconds; later configurations are skipped")
    parser.add_argument("--check-graph-breaks", nargs="?", const="all", default="",
                        help="torch._dynamo.explain of the first quantized block, for these models (default: all)")
    parser.add_argument("--profile", default="", help="comma list of model:mode, e.g. decoder:nvfp4-full")
    parser.add_argument("--channels-last", action="store_true",
                        help="convolution models (weights and image batch) in channels-last memory order, every mode")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--quick", action="store_true", help="tiny CPU smoke run: small models, 2 steps")
    args = parser.parse_args()
    if args.models is None:
        args.models = "decoder" if args.quick else "decoder,resnet50,unet"
    if args.modes is None:
        args.modes = "bf16,nvfp4-full" if args.quick else ",".join(MODES)
    for value, valid, flag in ((args.models, workloads(True), "--models"), (args.modes, MODES, "--modes"),
                               (args.compile, COMPILE_SETTINGS, "--compile")):
        bad = [v for v in value.split(",") if v.removesuffix(TF32_SUFFIX) not in valid]
        if bad:
            parser.error(f"{flag}: {bad} not valid; valid choices: {', '.join(valid)}")
    if args.quick:  # every code path once, small enough for a CPU test: resnet18 stands in for resnet50
        args.warmup, args.steps, args.compile_backend = 0, 2, "eager"
        torch.set_num_threads(1)
        args.check_graph_breaks = args.check_graph_breaks or "all"
        args.profile = args.profile or f"{args.models.split(',')[0]}:nvfp4-full"
    result = run(args)
    print(report(result))
    write_json(args.out, result)


if __name__ == "__main__":
    main()
