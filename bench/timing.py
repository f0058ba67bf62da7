"""Timing and report helpers shared by the benchmarks (device tool METHOD.md: warm-up, device events, medians, spread).

Why one place: every number the benches print must be measured the same way. On CUDA each repetition is bracketed by
CUDA events, after an L2 flush (a 256 MiB write, outside the timed region) so a tensor is never timed out of the cache
of its previous repetition; on CPU a monotonic clock is used. Short device work is timed as a CUDA-graph replay
(``replayed``), so that the host's Python and launch cost do not enter the number. Results are medians with the
10th/90th percentiles.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, ContextManager

import torch

_FLUSH_BYTES = 256 << 20
_flush_buffer: torch.Tensor | None = None


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float
    reps: int

    def spread(self) -> str:
        return f"{self.p10_ms:.3f}-{self.p90_ms:.3f}"


def _flush_l2(device: torch.device) -> None:
    global _flush_buffer
    if _flush_buffer is None or _flush_buffer.device != device:
        _flush_buffer = torch.empty(_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
    _flush_buffer.zero_()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def measure(fn: Callable[[], object], device: torch.device, warmup: int, reps: int, flush: bool = True) -> Timing:
    """Median (and 10th/90th percentiles) of ``reps`` timed calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = []
        for _ in range(reps):
            if flush:
                _flush_l2(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(reps):
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return Timing(statistics.median(times), _percentile(times, 0.1), _percentile(times, 0.9), reps)


def capture(fn: Callable[[], object], device: torch.device, warmup: int = 2,
            generators: tuple[torch.Generator, ...] = (), error_mode: str = "global",
            warmup_context: Callable[[], ContextManager[object]] = contextlib.nullcontext
            ) -> tuple[torch.cuda.CUDAGraph, object]:
    """(a CUDA graph of one call of ``fn``, that call's output). ``warmup`` calls run first on a side stream, inside
    ``warmup_context`` (capture requires a warmed-up, non-default stream); the capture runs on the same stream.
    ``generators``: CUDA generators ``fn`` draws from, registered so each replay draws anew. ``error_mode``:
    ``torch.cuda.graph``'s capture_error_mode."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), warmup_context():
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    for generator in generators:
        graph.register_generator_state(generator)
    with torch.cuda.graph(graph, stream=side, capture_error_mode=error_mode):
        output = fn()
    return graph, output


def replayed(fn: Callable[[], object], device: torch.device, generators: tuple[torch.Generator, ...] = ()
             ) -> Callable[[], object] | None:
    """``fn`` captured in a CUDA graph (``capture``); each call of the result replays it.

    Why: a quantization call issues a few kernels of tens of microseconds, and its Python and launch cost on the host
    can be longer than that; the events around an eager call then time the host, not the kernels (seen on the device
    machine: the same kernel timed 0.074 and 0.152 ms in two runs). A replay is one launch, so the events time the
    device work. None where the capture fails or there is no CUDA device (the caller then times ``fn`` eagerly and
    says so)."""
    if device.type != "cuda":
        return None
    try:
        graph, _ = capture(fn, device, generators=generators)
    except RuntimeError:  # torch.AcceleratorError derives from RuntimeError
        torch.cuda.synchronize(device)
        return None
    return graph.replay


def environment(device: torch.device) -> dict[str, object]:
    """What produced the numbers: device, versions, date, command line."""
    info: dict[str, object] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, cuda=torch.version.cuda, sm_count=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1))
    else:
        info["cpu"] = platform.processor() or platform.machine()
        info["threads"] = torch.get_num_threads()
    return info


def write_json(path: str | None, payload: dict[str, object], quiet: bool = False) -> None:
    """Write ``payload`` as JSON (Timing as a dict, anything else unknown as str); no-op without a path."""
    if path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=2, default=_jsonable))
        if not quiet:
            print(f"wrote {out}")


def _jsonable(value: object) -> object:
    if isinstance(value, Timing):
        return asdict(value)
    return str(value)


def table(header: list[str], rows: list[list[object]]) -> str:
    """Fixed-width text table."""
    cells = [[str(c) for c in header]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
