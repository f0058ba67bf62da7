"""The NaN/Inf check of the kernel path, without a host synchronisation per quantized tensor.

Why: the reference raises ``QuantError`` when a tensor to be quantized holds NaN or Inf (``quant.errors``), which
needs the amax on the host: one ``cudaStreamSynchronize`` per quantized operand. A training step quantizes hundreds of
operands, and every synchronisation drains the launch queue, so the kernel path checks asynchronously instead:

* every quantization gets a ticket (a call number remembered with the tensor's name); the amax kernels treat NaN as
  +inf and, when a tile is non-finite, ``atomic_min`` the ticket into one int64 flag per device, so the flag holds
  the first poisoned call. The quantize kernels also write NaN values and 0x7F / 0xFF (NaN) scale bytes for a
  poisoned tensor, so nothing downstream can look valid;
* ``poll`` (after each launch; it looks every ``_POLL_EVERY``-th call) keeps at most one non-blocking copy of the flag
  to pinned host memory in flight, checks it once its CUDA event has completed, and raises ``QuantError`` naming the
  first poisoned tensor: a few quantizations late (the message says so), never silently, with no added kernel launch
  and no synchronisation. Inside a CUDA graph capture it does nothing (no host reads there); the kernels still write
  the flag on every replay, and ``raise_pending`` after the replays reports it.

``raise_pending()`` synchronises and checks everything launched so far (tests, end of a run, ``bench/``). The
environment variable ``FP4LAB_SYNC_CHECKS=1`` (or ``set_synchronous(True)``) checks after each tensor, as the
reference does. CPU tensors (the Triton interpreter) are always checked immediately.

Names under torch.compile: a layer's name is a Python string that differs per layer; if traced code read it, Dynamo
would guard on its value and compile every layer again. A layer therefore registers its name once
(``register_owner``) and hands the kernels an ``OwnedName``: a handle tensor (a graph input, never guarded on) plus
the operand's words, which are the same for every layer ("output gradient (wgrad)"). The name string is built only
when an error is raised.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import Tensor

from quant.errors import QuantError, describe

CLEAR = torch.iinfo(torch.int64).max  # flag value while no poisoned tensor has been seen
_HISTORY = 1 << 16  # tickets whose names are remembered (a poisoned ticket older than this is reported without name)
_synchronous = os.environ.get("FP4LAB_SYNC_CHECKS", "0") == "1"
# ``poll`` looks at the flag after every _POLL_EVERY-th quantization: an event query or a copy costs host time
# comparable to a launch, and a poisoned tensor is still reported a few quantizations late.
_POLL_EVERY = 8


_owners: dict[int, str] = {}  # handle -> layer name (register_owner)


def register_owner(name: str) -> Tensor:
    """A handle for ``name`` (int64 CPU tensor [1]) that ``OwnedName`` carries instead of the string."""
    handle = len(_owners)
    _owners[handle] = name
    return torch.tensor([handle], dtype=torch.int64)


_siblings: dict[str, tuple[Tensor, list[str]]] = {}  # parent module -> (shared handle, the layers' last name parts)


def register_sibling(name: str) -> Tensor:
    """A handle shared by every layer registered under the same parent module as ``name`` (``a.b.q_proj`` and
    ``a.b.k_proj`` get one handle, named "one of a.b.{q_proj,k_proj}").

    Why: compiled code names input operands with it. torch.compile merges identical operations of one graph
    (AOTAutograd's common-subexpression pass), so the q/k/v projections' quantizations of the same input become one
    when their arguments are equal, as ``quant.shared_operands`` shares them in eager mode; a per-layer handle is an
    argument that differs and would keep three copies. The error then names the sibling group."""
    parent, _, leaf = name.rpartition(".")
    if parent not in _siblings:
        _siblings[parent] = (register_owner(name), [])
    handle, members = _siblings[parent]
    if leaf not in members:
        members.append(leaf)
    if len(members) > 1:
        _owners[int(handle)] = f"one of {parent + '.' if parent else ''}{{{','.join(members)}}}"
    return handle


def owner_name(handle: Tensor) -> str:
    return _owners.get(int(handle.reshape(-1)[0]), "<unregistered layer>")


@dataclass(frozen=True)
class OwnedName:
    """The name of one operand of a registered layer, e.g. "layers.0.mlp.fc1" + "output gradient (wgrad)"; it
    becomes a string (``str``) only in error messages, so compiled code never reads the layer's name."""

    owner: Tensor  # int64 CPU tensor [1] from register_owner
    words: str  # what the operand is; the same for every layer

    def __str__(self) -> str:
        return f"{owner_name(self.owner)} {self.words}"


def split_name(name: object) -> tuple[str, Tensor | None]:
    """(words, owner handle) of an ``OwnedName``; (the name as given or "", None) for a plain string or None."""
    if isinstance(name, OwnedName):
        return name.words, name.owner
    return name or "", None


@dataclass
class _DeviceFlag:
    flag: Tensor  # int64 [1] on the device: smallest poisoned ticket, or CLEAR
    host: Tensor  # pinned int64 [1]: the last copy of ``flag``
    copy_done: torch.cuda.Event | None = None  # event behind the copy in flight (None: no copy in flight)
    skipped: int = 0  # polls since the last look at the flag (``_POLL_EVERY``)
    # ticket -> (format, name, stage, owner handle or None)
    names: dict[int, tuple[str, str | None, str, Tensor | None]] = field(default_factory=dict)


_flags: dict[torch.device, _DeviceFlag] = {}
_next_ticket = 0


def set_synchronous(enabled: bool) -> None:
    """Check each tensor right after its amax (one synchronisation per tensor) or asynchronously (default)."""
    global _synchronous
    _synchronous = bool(enabled)


def ticket(device: torch.device, fmt: str, name: str | None, stage: str = "", owner: Tensor | None = None
           ) -> tuple[Tensor, int]:
    """(the device's flag tensor, a new ticket) for one quantization; pass both to the amax kernel. ``owner``: the
    handle of the layer whose operand ``name`` is (``register_owner``), or None when ``name`` is complete."""
    global _next_ticket
    state = _flags.get(device)
    if state is None:
        pinned = device.type == "cuda"
        state = _DeviceFlag(torch.full((1,), CLEAR, dtype=torch.int64, device=device),
                            torch.full((1,), CLEAR, dtype=torch.int64, pin_memory=pinned))
        _flags[device] = state
    number = _next_ticket
    _next_ticket += 1
    state.names[number] = (fmt, name, stage, owner)
    state.names.pop(number - _HISTORY, None)
    return state.flag, number


def poll(device: torch.device) -> None:
    """After a launch: raise for a poisoned tensor already seen by the host, keep one flag copy in flight."""
    state = _flags[device]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return  # a CUDA graph capture: no host read or event query; the flag is checked after replays (raise_pending)
    if device.type != "cuda" or _synchronous:
        _raise_if_poisoned(state, int(state.flag[0]), late=False)
        return
    state.skipped = (state.skipped + 1) % _POLL_EVERY
    if state.skipped:
        return
    if state.copy_done is not None:
        if not state.copy_done.query():
            return
        state.copy_done = None
        _raise_if_poisoned(state, int(state.host[0]), late=True)
    state.host.copy_(state.flag, non_blocking=True)
    state.copy_done = torch.cuda.Event()
    state.copy_done.record()


def raise_pending(wait: bool = True) -> None:
    """Raise ``QuantError`` if a tensor quantized so far held NaN or Inf: all of them after a synchronisation
    (``wait=True``), or only those the host has already seen (``wait=False``, never blocks)."""
    for device, state in _flags.items():
        if not wait:
            poll(device)
            continue
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        state.copy_done = None
        _raise_if_poisoned(state, int(state.flag[0]), late=device.type == "cuda")


def _raise_if_poisoned(state: _DeviceFlag, value: int, late: bool) -> None:
    if value == CLEAR:
        return
    fmt, name, stage, owner = state.names.get(value, ("NVFP4/MXFP4", None, "", None))
    if owner is not None:
        name = str(OwnedName(owner, name or ""))
    state.flag.fill_(CLEAR)
    state.host.fill_(CLEAR)
    state.names.clear()
    where = f" {stage}" if stage else ""
    when = " (found by the asynchronous check of the GPU kernels, a few launches later)" if late else ""
    raise QuantError(
        f"{fmt}: {describe(name)}{where} contains NaN or Inf values{when}; quantization of non-finite values is "
        "undefined, fix the producer of this tensor (e.g. lower the learning rate, enable gradient clipping or loss "
        "scaling)"
    )
