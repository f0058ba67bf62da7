"""What the emulated layers do under data parallelism: whose amax scales an operand, and which SR stream a rank uses.

Transformer Engine's behaviour, which this module reproduces for the emulation (DDP or FSDP, one model replica or
shard per rank):

* Weights are identical on every rank (DDP all-reduces the gradients; FSDP all-gathers the full weight before each
  forward), so a weight's amax, scales and codes agree across ranks without any communication. Weights are never
  reduced here.
* Activations (X) and output gradients (dY) are quantized with the amax of the *local* tensor. TE reduces their amax
  only for quantizers that have ``with_amax_reduction`` set (it sets it for the input and grad-output quantizers of
  sequence-parallel layers, over the tensor-parallel group). ``Policy.amax_reduction="world"``, or
  ``set_amax_reduction_group(model, group)`` for another group, makes every input and grad operand use the MAX of the
  amax over the group instead. Blocks never cross the token dim's split between ranks (1x16 blocks along K or N are
  rows of one rank; blocks along tokens stay within a rank when its token count is a multiple of 16), so each rank's
  operand is then byte for byte its slice of the operand quantized from the concatenated global tensor.
* Stochastic rounding: rank r draws from the generator seeded with ``rank_seed(seed, r)``; rank 0 keeps ``seed``, so
  a single-process run and rank 0 of a data-parallel run share their stream.

Load-bearing: the reduction is a collective. Every rank must quantize the same operands in the same order (true for
DDP/FSDP training, validation and test, where every rank runs the same graph), and code that runs on one rank only
(analysis callbacks) must quantize weights only, which never communicate. A non-finite amax enters the reduction as
+inf, so a NaN on one rank is reported on every rank instead of leaving the others waiting in the collective.
"""
from __future__ import annotations

import hashlib
from functools import partial
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from quant.errors import QuantError, describe

AMAX_REDUCTIONS = ("none", "world")
AmaxReducer = Callable[[Tensor], Tensor]  # local FP32 amax -> the amax the scales are computed from
_MASK64 = (1 << 64) - 1


def is_distributed() -> bool:
    """A default process group exists (torch.distributed initialised by DDP/FSDP, torchrun, ...)."""
    return dist.is_available() and dist.is_initialized()


def process_rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def rank_seed(seed: int, rank: int) -> int:
    """The SR seed of ``rank`` for a layer seeded with ``seed``: ``seed`` itself on rank 0, a well-mixed 63-bit
    function of (seed, rank) elsewhere, so ranks never share a stream."""
    if rank == 0:
        return seed
    return _splitmix64(_splitmix64(seed & _MASK64) ^ rank) >> 1


def state_seed(state: Tensor) -> int:
    """A 63-bit seed from a generator state's bytes (used to derive rank r's stream from rank 0's saved state)."""
    digest = hashlib.blake2b(state.detach().cpu().contiguous().numpy().tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def all_reduce_amax(amax: Tensor, group: object = None) -> Tensor:
    """MAX of a float32 scalar amax over ``group`` (None: the default group); a NaN or Inf enters as +inf, so every
    rank sees that some rank's tensor is not finite. Returns a float32 scalar on ``amax``'s device."""
    buffer = torch.where(torch.isfinite(amax), amax, torch.full_like(amax, float("inf"))).reshape(1).clone()
    dist.all_reduce(buffer, op=dist.ReduceOp.MAX, group=group)
    return buffer.reshape(())


def checked_group_amax(local: Tensor, group_amax: Tensor, fmt: str, name: str | None) -> Tensor:
    """``group_amax`` once the caller has checked ``local`` (this rank's amax) itself: an error if another rank's
    tensor was not finite."""
    if not bool(torch.isfinite(group_amax)):
        raise QuantError(
            f"{fmt}: {describe(name)} is finite on this rank but NaN or Inf on another rank of its amax reduction "
            "group (see that rank's error); quantization of non-finite values is undefined"
        )
    return group_amax


class AmaxReduction:
    """Which amax an activation or gradient operand of one layer uses: its own (``none``), the MAX over the default
    process group (``world``), or over an explicit group (``set_amax_reduction_group``).

    A process group cannot be pickled (``ddp_spawn`` pickles the model): an explicit group is dropped with the pickle,
    ``world`` is looked up when the operand is quantized and survives."""

    def __init__(self, mode: str = "none") -> None:
        if mode not in AMAX_REDUCTIONS:
            raise QuantError(f"amax_reduction={mode!r} is not valid; valid choices: {', '.join(AMAX_REDUCTIONS)}")
        self.mode = mode
        self.group: object | None = None  # an explicit torch.distributed ProcessGroup, when set

    def reducer(self) -> AmaxReducer | None:
        """The reduction to apply now (None: local amax, also when there is no process group or only one rank)."""
        if self.group is not None:
            return partial(all_reduce_amax, group=self.group)
        if self.mode == "world" and is_distributed() and dist.get_world_size() > 1:
            return all_reduce_amax
        return None

    def describe(self) -> str:
        return "group" if self.group is not None else self.mode

    def __getstate__(self) -> dict[str, object]:
        return {"mode": self.mode, "group": None}


def set_amax_reduction_group(model: nn.Module, group: object | None) -> int:
    """Reduce the activation and gradient amax of every quantized layer of ``model`` over ``group`` (a
    ``torch.distributed`` ProcessGroup, e.g. from ``dist.new_group``), or go back to the policy's ``amax_reduction``
    with ``group=None``. Call it on every rank of the group after the process group exists. Returns the number of
    layers changed."""
    from quant.modules import quantized_modules  # quant.modules imports this module through quant.functional

    layers = quantized_modules(model)
    for module in layers.values():
        module.quantizer.amax_reduction.group = group
    return len(layers)
